"""The package as users install it: built (sdist, then the wheel from the sdist, as a release
is), installed non-editable into a fresh virtualenv, and run from a directory outside the
repository, so that only what the wheel carries can be used: ``etl demo`` and
``etl db upgrade`` on SQLite and on PostgreSQL.

One build and one virtualenv serve the whole module. The virtualenv gets the plain wheel
first (the SQLite cases run without the PostgreSQL driver) and the ``postgres`` extra only
when a PostgreSQL case asks for it. Installing downloads the dependencies from the package
index that pip is configured with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from etl.db import normalise_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"
#: where the wheel carries the repository's alembic.ini and migrations/
PACKAGED = "etl/_alembic"


def repo_head() -> str:
    """The head revision of the repository's migrations/ (not of the installed copy)."""
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head
    return head


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could put the repository on sys.path or pick
    a database or config file; pip's own settings (index, certificates) stay."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "ETL_DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ETL_")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def run(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Venv:
    path: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def etl(self) -> Path:
        return self.path / "bin" / "etl"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    built = run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        cwd=out,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Dist(wheel=wheels[0], sdist=sdists[0])


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtualenv, outside the repository, with the plain wheel installed."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    made = run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    assert made.returncode == 0, made.stderr
    env = Venv(path=path, wheel=dist.wheel)
    installed = run(
        [str(env.python), "-m", "pip", "install", "-q", str(dist.wheel)],
        cwd=path.parent,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env


@pytest.fixture(scope="module")
def venv_pg(venv: Venv) -> Venv:
    """The same virtualenv with the wheel's ``postgres`` extra added."""
    installed = run(
        [str(venv.python), "-m", "pip", "install", "-q", f"{venv.wheel}[postgres]"],
        cwd=venv.path.parent,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty current directory outside the repository (no etl/, no alembic.ini)."""
    path = tmp_path / "work"
    path.mkdir()
    assert not path.resolve().is_relative_to(ROOT)
    return path


def db_revision(url: str) -> str:
    """The revision in the database's alembic_version table, read directly."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


# -- what was built ----------------------------------------------------------------------


def test_wheel_carries_the_migrations_and_alembic_ini(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        names = set(zf.namelist())
        expected = {
            f"{PACKAGED}/alembic.ini": ROOT / "alembic.ini",
            f"{PACKAGED}/migrations/env.py": MIGRATIONS / "env.py",
            f"{PACKAGED}/migrations/script.py.mako": MIGRATIONS / "script.py.mako",
        }
        versions = sorted((MIGRATIONS / "versions").glob("*.py"))
        assert versions
        for path in versions:
            expected[f"{PACKAGED}/migrations/versions/{path.name}"] = path
        for name, source in expected.items():
            assert name in names, f"{name} missing from {dist.wheel.name}"
            assert zf.read(name) == source.read_bytes(), f"{name} differs from {source}"
    assert {"etl/__init__.py", "etl/db.py", "etl/py.typed"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.split("/")[0] in ("migrations", "tests", "alembic.ini")]


def test_sdist_holds_what_the_wheel_is_built_from(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "alembic.ini", "etl/db.py", "etl/py.typed"} <= names
    assert {"migrations/env.py", "migrations/script.py.mako"} <= names
    for path in (MIGRATIONS / "versions").glob("*.py"):
        assert f"migrations/versions/{path.name}" in names


def test_installed_etl_is_the_wheels(venv: Venv, workdir: Path) -> None:
    """The venv imports etl from its own site-packages, and finds its migrations there."""
    probe = run(
        [
            str(venv.python),
            "-c",
            "import etl, etl.db; print(etl.__file__); print(etl.db.MIGRATIONS)",
        ],
        cwd=workdir,
    )
    assert probe.returncode == 0, probe.stderr
    package_file, migrations = (Path(line) for line in probe.stdout.splitlines())
    site = venv.path.resolve()
    assert package_file.resolve().is_relative_to(site), package_file
    assert migrations.resolve().is_relative_to(site), migrations
    assert migrations.parts[-2:] == ("_alembic", "migrations")
    assert not package_file.resolve().is_relative_to(ROOT)


# -- what the installed command does -----------------------------------------------------


def test_etl_demo(venv: Venv, workdir: Path) -> None:
    done = run(
        [str(venv.etl), "demo", "--instances", "2", "--chats", "10", "--ticks", "2"],
        cwd=workdir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "instances:          2" in done.stdout
    assert db_revision(f"sqlite:///{workdir / 'chats-demo.db'}") == repo_head()


def test_etl_db_upgrade(
    venv: Venv, workdir: Path, db_url: str, request: pytest.FixtureRequest
) -> None:
    """`etl db upgrade` on an empty database of each backend (PostgreSQL: one of its own,
    dropped afterwards, through the postgres extra), then `etl db current`."""
    if db_url.startswith("postgresql"):
        venv = request.getfixturevalue("venv_pg")
    env = clean_env(ETL_DATABASE_URL=db_url)
    up = run([str(venv.etl), "db", "upgrade"], cwd=workdir, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    head = repo_head()
    assert f"is at revision {head}" in up.stdout

    current = run([str(venv.etl), "db", "current"], cwd=workdir, env=env)
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"current={head} head={head} (up to date)" in current.stdout
    assert db_revision(db_url) == head
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written to the cwd


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_etl_demo_on_postgresql(venv_pg: Venv, workdir: Path, db_url: str) -> None:
    """`etl demo --database-url` into a PostgreSQL database of its own (dropped
    afterwards), through the postgres extra; nothing is written to the current directory.
    After the SQLite cases, so that those run without the driver."""
    done = run(
        [str(venv_pg.etl), "demo", "--instances", "2", "--chats", "10", "--ticks", "2"]
        + ["--database-url", db_url],
        cwd=workdir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "instances:          2" in done.stdout
    assert db_revision(db_url) == repo_head()
    engine = create_engine(normalise_url(db_url))
    try:
        with engine.connect() as conn:
            ok = conn.execute(text("SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'"))
            assert ok.scalar_one() >= 2
    finally:
        engine.dispose()
    assert sorted(p.name for p in workdir.iterdir()) == []

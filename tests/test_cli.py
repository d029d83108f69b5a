"""The command line: help texts, and end-to-end runs of ``python -m etl`` as real processes
against the simulator over HTTP and real databases."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click
import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import Engine

from etl import __version__
from etl.cli import cli
from etl.config import parse_config
from etl.db import ROOT, head_revision, make_engine, upgrade
from etl.simulator import Fault, Simulator
from tests.factories import check_history_invariants, rows, scalar

README = ROOT / "README.md"


def etl_env(**extra: str) -> dict[str, str]:
    """The current environment without ETL_DATABASE_URL / ETL_CONFIG, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("ETL_DATABASE_URL", "ETL_CONFIG")}
    env.update(extra)
    return env


def run_etl(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etl", *args],
        cwd=cwd,
        env=env if env is not None else etl_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path, sim: Simulator, *, database_url: str | None = None) -> Path:
    path.write_text(sim.config_toml(database_url=database_url), encoding="utf-8")
    path.chmod(0o600)
    return path


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def migrated(url: str) -> Engine:
    engine = make_engine(url)
    upgrade(engine)
    return engine


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, one ``error:`` line on stderr naming ``needles``, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def sim_config(tmp_path: Path, sim: Simulator) -> Path:
    return write_config(tmp_path / "etl.toml", sim)


# -- help and documentation ---------------------------------------------------------------


def _command_tree(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, sub in sorted(group.commands.items()):
        if isinstance(sub, click.Group):
            yield from _command_tree(sub, (*path, name))
        else:
            yield (*path, name), sub


COMMANDS = list(_command_tree(cli))


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "etl" for p, _ in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert (command.help or "").strip(), f"`etl {' '.join(path)}` has no help text"
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="etl")
    assert result.exit_code == 0, result.output
    assert f"Usage: etl {' '.join(path)}".rstrip() in result.output
    first_words = " ".join((command.help or "").split()[:8])
    assert first_words in " ".join(result.output.split())
    if path:  # the global options are accepted after the subcommand too
        for opt in ("--config", "--database-url", "--log-level", "--log-format"):
            assert opt in result.output, f"`etl {' '.join(path)} --help` lacks {opt}"


def test_command_tree_is_complete() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    expected = {"", "demo", "run", "simulate", "sync", "db"}
    expected |= {"db upgrade", "db downgrade", "db current"}
    assert expected <= names


@pytest.mark.xfail(
    not README.exists(), reason="README.md not written yet (the lead adds it)", strict=False
)
def test_readme_mentions_every_top_level_command() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [name for name in cli.commands if f"etl {name}" not in text]
    assert missing == [], f"README.md does not mention: {missing}"
    for name in ("upgrade", "downgrade", "current"):
        assert f"etl db {name}" in text


def test_sync_without_once_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["sync"], prog_name="etl")
    assert result.exit_code == 2
    assert "etl sync --once" in result.output


@pytest.mark.parametrize("command", ["sync --once", "run"])
def test_workers_must_be_positive(command: str) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--workers", "0"], prog_name="etl")
    assert result.exit_code == 2
    assert "--workers" in result.output


def test_unreachable_database_is_one_clean_line(tmp_path: Path) -> None:
    url = "postgresql://etl:pw-s3cret-pw@127.0.0.1:1/nothing"  # nothing listens on port 1
    proc = run_etl("db", "current", "--database-url", url, cwd=tmp_path)
    assert proc.returncode == 2
    assert_clean_error(proc, "error: database:")
    assert "pw-s3cret-pw" not in proc.stderr + proc.stdout


def test_version(tmp_path: Path) -> None:
    proc = run_etl("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout
    assert "chatsync" in proc.stdout


# -- end to end: db upgrade, sync --once ---------------------------------------------------


def test_upgrade_then_sync_once(tmp_path: Path, sim: Simulator, db_url: str) -> None:
    write_config(tmp_path / "etl.toml", sim)  # found as ./etl.toml
    env = etl_env(ETL_DATABASE_URL=db_url)

    up = run_etl("db", "upgrade", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    assert f"is at revision {head_revision()}" in up.stdout

    proc = run_etl("sync", "--once", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["instance", "status", "kind"]
    table = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert set(table) == set(sim.instance_ids)
    for iid, cols in table.items():
        assert cols[1] == "ok", proc.stdout
        assert int(cols[3]) == len(sim.chats(iid))  # recv
        assert int(cols[4]) == len(sim.chats(iid))  # new

    engine = make_engine(db_url)
    try:
        runs = rows(engine, "SELECT instance_id, status FROM sync_runs ORDER BY instance_id")
        assert [(r.instance_id, r.status) for r in runs] == [(i, "ok") for i in sim.instance_ids]
        for iid in sim.instance_ids:
            n = scalar(engine, "SELECT COUNT(*) FROM chats WHERE instance_id = :i", i=iid)
            assert n == len(sim.chats(iid))
        assert scalar(engine, "SELECT COUNT(*) FROM instances") == len(sim.instance_ids)
        check_history_invariants(engine)
    finally:
        engine.dispose()
    assert not (tmp_path / "chats.db").exists()  # the default URL was not used


#: what `etl sync --once` does not use, and so must not import: a fresh process pays for
#: every import on every run (docs/benchmarks.md, "A fresh process")
NOT_FOR_SYNC_ONCE = (
    "alembic",
    "apscheduler",
    "prometheus_client",
    "pythonjsonlogger",
    "etl.scheduler",
    "etl.web",
    "etl.metrics",
    "etl.status",
    "etl.retention",
    "etl.demo",
    "etl.simulator",
)


def test_sync_once_imports_only_what_it_uses(
    tmp_path: Path, sim: Simulator, sim_config: Path, db_url: str
) -> None:
    migrated(db_url).dispose()
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('imported:', sorted({m for m in sys.modules "
        f"if m.split('.')[0] in {NOT_FOR_SYNC_ONCE!r} or m in {NOT_FOR_SYNC_ONCE!r}}}), "
        "file=sys.stderr))\n"
        "sys.argv = ['etl', 'sync', '--once']\n"
        "from etl.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=etl_env(ETL_DATABASE_URL=db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sim.request_count() == len(sim.instance_ids)  # it did sync
    assert "imported: []" in proc.stderr.splitlines(), proc.stderr[-2000:]


def test_sync_once_exits_1_when_an_instance_fails(
    tmp_path: Path, sim: Simulator, sim_config: Path
) -> None:
    url = sqlite_url(tmp_path / "a.db")
    engine = migrated(url)
    bad = sim.instance_ids[1]
    sim.set_fault(bad, Fault(status=401))
    try:
        proc = run_etl("sync", "--once", cwd=tmp_path, env=etl_env(ETL_DATABASE_URL=url))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        table = {
            int(line.split()[0]): line.split()
            for line in proc.stdout.splitlines()[1:]
            if line.split() and line.split()[0].isdigit()
        }
        assert table[bad][1:3] == ["failed", "unauthorized"]
        assert all(table[i][1] == "ok" for i in sim.instance_ids if i != bad)
        runs = {
            r.instance_id: r
            for r in rows(engine, "SELECT instance_id, status, http_status FROM sync_runs")
        }
        assert (runs[bad].status, runs[bad].http_status) == ("failed", 401)
        assert all(runs[i].status == "ok" for i in sim.instance_ids if i != bad)
        assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE instance_id = :i", i=bad) == 0
        assert sim.request_count(bad) == 1  # 401 is not retried
    finally:
        engine.dispose()


@pytest.mark.parametrize("args", [("sync", "--once"), ("run",)], ids=["sync", "run"])
def test_refuses_before_db_upgrade(
    tmp_path: Path, sim: Simulator, sim_config: Path, args: tuple[str, ...]
) -> None:
    db_file = tmp_path / "empty.db"
    proc = run_etl(*args, cwd=tmp_path, env=etl_env(ETL_DATABASE_URL=sqlite_url(db_file)))
    assert_clean_error(proc, "etl db upgrade", "has no schema")
    assert proc.returncode == 2
    assert sim.request_count() == 0
    engine = make_engine(sqlite_url(db_file))
    try:  # it did not quietly create the schema
        assert scalar(engine, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'") == 0
    finally:
        engine.dispose()


# -- global options: position and precedence ---------------------------------------------


@pytest.mark.parametrize("case", ["before", "after-later-wins", "env-over-file", "file-only"])
def test_global_options_position_and_precedence(tmp_path: Path, sim: Simulator, case: str) -> None:
    """flag > $ETL_DATABASE_URL > the file's database_url; options before or after `sync`."""
    urls = {name: sqlite_url(tmp_path / f"{name}.db") for name in ("env", "flag", "file")}
    engines = {name: migrated(url) for name, url in urls.items()}
    config = write_config(tmp_path / "x.toml", sim, database_url=urls["file"])
    # ./etl.toml and $ETL_CONFIG are decoys: --config must win over both
    (tmp_path / "etl.toml").write_text("decoy = true\n", encoding="utf-8")
    env = etl_env(ETL_DATABASE_URL=urls["env"], ETL_CONFIG=str(tmp_path / "missing.toml"))
    cfg, db = ("--config", str(config)), ("--database-url", urls["flag"])
    expected = "flag"
    if case == "before":
        args: tuple[str, ...] = (*cfg, *db, "sync", "--once")
    elif case == "after-later-wins":  # a flag after the subcommand beats one before it
        nope = ("--database-url", sqlite_url(tmp_path / "nope.db"))
        args = (*nope, "sync", "--once", *cfg, *db)
    elif case == "env-over-file":
        args, expected = ("sync", "--once", *cfg), "env"
    else:
        del env["ETL_DATABASE_URL"]
        args, expected = (*cfg, "sync", "--once"), "file"
    try:
        proc = run_etl(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        counts = {
            name: scalar(eng, "SELECT COUNT(*) FROM sync_runs") for name, eng in engines.items()
        }
        assert counts[expected] == len(sim.instance_ids), counts
        assert sum(counts.values()) == counts[expected], f"rows in the wrong database: {counts}"
        assert not (tmp_path / "chats.db").exists()
        assert not (tmp_path / "nope.db").exists()
    finally:
        for eng in engines.values():
            eng.dispose()


def test_config_error_is_one_clean_line(tmp_path: Path, sim: Simulator) -> None:
    bad = tmp_path / "bad.toml"
    text = sim.config_toml().replace("[defaults]", "bogus_setting = 1\n\n[defaults]", 1)
    text = text.replace("[[instances]]\n", "[[instances]]\ntokn = 'x'\n", 1)
    bad.write_text(text, encoding="utf-8")
    bad.chmod(0o600)
    db_file = tmp_path / "db.db"
    proc = run_etl(
        "sync",
        "--once",
        "--config",
        str(bad),
        cwd=tmp_path,
        env=etl_env(ETL_DATABASE_URL=sqlite_url(db_file)),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_clean_error(proc, "bogus_setting", "unknown key", str(sim.instance_ids[0]), "tokn")
    assert proc.stdout == ""
    assert sim.request_count() == 0
    assert not db_file.exists()


# -- demo ---------------------------------------------------------------------------------

DEMO_ARGS = ("--instances", "2", "--chats", "20", "--ticks", "2", "--interval", "1")


def _assert_demo_output(stdout: str) -> None:
    for label in ("instances:", "chats:", "ephemeral changes:", "sync runs:"):
        assert f"\n{label}" in stdout, stdout
    assert "instances:          2" in stdout
    assert stdout.count("SELECT ") >= 2
    assert "-- Chats with disappearing messages on, per instance" in stdout
    assert "-- Latest ephemeral setting changes" in stdout


def test_demo_uses_its_own_sqlite_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    config = tmp_path / "elsewhere" / "etl.toml"
    config.write_text(f'database_url = "{sqlite_url(other.with_name("cfg.db"))}"\n')
    env = etl_env(ETL_DATABASE_URL=sqlite_url(other), ETL_CONFIG=str(config))
    proc = run_etl("demo", *DEMO_ARGS, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_demo_output(proc.stdout)
    assert (tmp_path / "chats-demo.db").exists()
    assert sorted(p.name for p in other.parent.iterdir()) == ["etl.toml"]  # nothing else touched
    engine = make_engine(sqlite_url(tmp_path / "chats-demo.db"))
    try:
        assert scalar(engine, "SELECT COUNT(*) FROM instances") == 2
        assert scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'") >= 2
        assert scalar(engine, "SELECT COUNT(*) FROM chats") >= 40
        check_history_invariants(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_demo_on_postgresql(tmp_path: Path, db_url: str) -> None:
    proc = run_etl("demo", *DEMO_ARGS, "--database-url", db_url, cwd=tmp_path, env=etl_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_demo_output(proc.stdout)
    assert not (tmp_path / "chats-demo.db").exists()
    engine = make_engine(db_url)
    try:
        assert scalar(engine, "SELECT COUNT(*) FROM instances") == 2
        assert scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'") >= 2
        check_history_invariants(engine)
    finally:
        engine.dispose()


# -- simulate ------------------------------------------------------------------------------

SIM_TOKEN = "5" * 50


@contextmanager
def simulate(*args: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`python -m etl simulate --port 0 ARGS...` as a real process: its URL and the config
    it prints (parsed); stopped with Ctrl-C afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "simulate", "--port", "0", "--token", SIM_TOKEN, *args],
        env=etl_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # the end

    threading.Thread(target=read, args=(proc.stdout,), daemon=True).start()
    try:
        printed: list[str] = []
        instances = int(args[args.index("--instances") + 1])
        # the URL line, then the config; it ends with a blank line after the last instance
        while printed.count("[[instances]]\n") < instances or printed[-1] != "\n":
            line = lines.get(timeout=60)
            assert line, "etl simulate ended early:\n" + "".join(printed)
            printed.append(line)
        found = re.match(r"# Green-API simulator on (http://127\.0\.0\.1:\d+): ", printed[0])
        assert found, printed[0]
        yield found.group(1), tomllib.loads("".join(printed[1:]))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            assert proc.stderr is not None
            stderr = proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
    assert SIM_TOKEN not in stderr  # the simulator's logs redact tokens too


def method(url: str, iid: int, name: str) -> str:
    return f"{url}/waInstance{iid}/{name}/{SIM_TOKEN}"


def served_ids(url: str, iid: int) -> list[str]:
    answer = requests.get(method(url, iid, "getChats"), timeout=20)
    assert answer.status_code == 200, answer.text
    return [str(c["id"]) for c in answer.json()]


@pytest.mark.parametrize(("step", "lid"), [(0, True), (1, False)])
def test_simulate_lid_switch_at_step_without_ticks(step: int, lid: bool) -> None:
    """--lid-switch-at-step 0: person chats are @lid from the start, groups keep theirs;
    --lid-switch-at-step 1 with no ticks (--tick-seconds 0): never. The same seed's list,
    as the Python API serves it, gives the ids to expect."""
    args = ["--instances", "1", "--chats", "20", "--seed", "7", "--tick-seconds", "0"]
    with simulate(*args, "--lid-switch-at-step", str(step)) as (url, config):
        (iid,) = [i["id_instance"] for i in config["instances"]]
        got = served_ids(url, iid)
    reference = Simulator(instances=1, chats=20, seed=7)
    phones = [str(c["id"]) for c in reference.chats(iid)]
    assert sum(p.endswith("@c.us") for p in phones) >= 5
    assert any(p.endswith("@g.us") for p in phones)
    expected = [reference.lid_of(p) if lid and p.endswith("@c.us") else p for p in phones]
    assert got == expected


def test_simulate_switches_to_lid_mode_at_its_step_and_keeps_the_check_quota() -> None:
    """With ticks, the list turns to @lid at the given step; checkWhatsapp answers the lid
    of a phone-number id until --check-quota requests are used, then 466 as documented."""
    args = ["--instances", "1", "--chats", "20", "--seed", "7", "--tick-seconds", "0.5"]
    with simulate(*args, "--lid-switch-at-step", "2", "--check-quota", "2") as (url, config):
        (iid,) = [i["id_instance"] for i in config["instances"]]
        deadline = time.monotonic() + 120  # a busy machine ticks late, not never
        ids = served_ids(url, iid)
        while any(i.endswith("@c.us") for i in ids):
            assert time.monotonic() < deadline, ids
            time.sleep(0.2)
            ids = served_ids(url, iid)
        assert any(i.endswith("@lid") for i in ids) and any(i.endswith("@g.us") for i in ids)
        check = method(url, iid, "checkWhatsapp")
        answers = [
            requests.post(check, json={"phoneNumber": 79001234560 + n}, timeout=20)
            for n in range(3)
        ]
    reference = Simulator(instances=1, chats=0, seed=7)
    assert [a.status_code for a in answers] == [200, 200, 466]
    assert answers[0].json() == {
        "existsWhatsapp": True,
        "chatId": reference.lid_of("79001234560@c.us"),
    }
    status = answers[2].json()["invokeStatus"]
    assert (status["method"], status["used"], status["total"]) == ("checkwhatsapp", 2, 2)


def test_simulate_without_check_quota_has_no_limit() -> None:
    args = ["--instances", "1", "--chats", "5", "--tick-seconds", "0"]
    with simulate(*args) as (url, config):
        (iid,) = [i["id_instance"] for i in config["instances"]]
        check = method(url, iid, "checkWhatsapp")
        statuses = [
            requests.post(check, json={"phoneNumber": 79001234560 + n}, timeout=20).status_code
            for n in range(3)
        ]
    assert statuses == [200, 200, 200]


@pytest.mark.parametrize("platform", ["telegram", "max"])
def test_simulate_platform(platform: str) -> None:
    """--platform: every instance answers getChats with that messenger's elements
    (``chatId``, no ``id``), and the config it prints says the platform."""
    args = ["--instances", "2", "--chats", "10", "--tick-seconds", "0"]
    with simulate(*args, "--platform", platform) as (url, config):
        bodies = [
            requests.get(method(url, i["id_instance"], "getChats"), timeout=20).json()
            for i in config["instances"]
        ]
    assert [i["platform"] for i in config["instances"]] == [platform, platform]
    assert all(len(body) == 10 for body in bodies)
    for body in bodies:
        assert all("id" not in c and isinstance(c["chatId"], str) for c in body)
        assert any(c["chatId"].startswith("-") for c in body)  # a group
    # the printed config is one chatsync reads, with the platform
    parsed = parse_config(config)
    assert {i.platform for i in parsed.instances} == {platform}

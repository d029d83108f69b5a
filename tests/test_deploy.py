"""The container deployment: Dockerfile, .dockerignore, docker-compose.yml and deploy/.

No Docker engine is needed. The static tests check that the files agree with each other and
with the code (CLI commands and flags, environment variable names, config schema); the
PostgreSQL test then runs what the compose services run (`etl db upgrade`, `etl simulate`
with the compose flags, `etl sync --once`, `etl run` stopped by SIGTERM) as subprocesses, with
the compose environment and the demo config, against a throwaway database.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import requests
import yaml
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

import etl.redact
from etl.cli import cli
from etl.config import (
    ENV_CONFIG,
    ENV_DATABASE_URL,
    FileConfig,
    check_api_url,
    parse_config,
    resolve_instances,
)
from etl.db import make_engine, normalise_url
from etl.errors import ConfigError
from etl.simulator import Simulator
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_CONFIG = ROOT / "deploy" / "etl.example.toml"
DEMO_CONFIG = ROOT / "deploy" / "etl.demo.toml"
TOKENS_EXAMPLE = ROOT / "deploy" / "tokens.env.example"

#: What the image needs from the repository to install and to run migrations.
IMAGE_PATHS = {"pyproject.toml", "README.md", "etl", "migrations", "alembic.ini"}
BUILD_SERVICES = ("migrate", "etl", "simulator")


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svc = compose["services"]
    assert isinstance(svc, dict)
    return svc


@pytest.fixture
def isolated_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_instances registers every token for redaction, process-wide: undo that, so
    the placeholder tokens are not masked in the other tests' output."""
    monkeypatch.setattr(etl.redact, "_secrets", etl.redact._secrets)


def read_env_file(path: Path) -> dict[str, str]:
    """A compose env_file, in the plain KEY=value form the example promises."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=value"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{number}: bad name {key!r}"
        assert value and value == value.strip(), f"{path.name}:{number}: empty or padded value"
        assert value[0] not in "'\"", f"{path.name}:{number}: quoted value"
        assert key not in env, f"{path.name}:{number}: {key} set twice"
        env[key] = value
    return env


def load_toml(path: Path) -> tuple[dict[str, Any], FileConfig]:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return raw, parse_config(raw, source=str(path))


def option_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} not given exactly once in {args}"
    return args[args.index(flag) + 1]


def parse_cli(args: list[str]) -> click.Context:
    """Parse ``etl ARGS`` like click does when it runs them, without running the command:
    unknown commands or options and bad values (e.g. a non-integer --port) raise. The
    subcommand must come first (no group options before it), as in the compose file."""
    command: click.Command = cli
    ctx = click.Context(cli, info_name="etl")
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest and not rest[0].startswith("-"), f"{args}: no subcommand first"
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None, f"{args}: no command {rest[0]!r}"
        command = sub
        if isinstance(sub, click.Group):
            ctx = click.Context(sub, info_name=name, parent=ctx)
        else:
            ctx = sub.make_context(name, rest, parent=ctx)
    return ctx


def command_words(args: list[str]) -> list[str]:
    """The subcommand path of ``etl ARGS``, e.g. ["db", "upgrade"]."""
    words: list[str] = []
    ctx: click.Context | None = parse_cli(args)
    while ctx is not None and ctx.parent is not None:
        words.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return words


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        instruction, _, arguments = full.partition(" ")
        out.append((instruction.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves PATH (relative, '/'-separated) out of the build context: the
    last matching pattern wins, and a pattern matching a parent directory matches."""
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"unsupported duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


# -- docker-compose.yml ------------------------------------------------------------------


def test_compose_file_structure(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "version" not in compose  # obsolete in the Compose specification
    assert set(services) >= {"postgres", "migrate", "etl", "simulator"}
    for name in BUILD_SERVICES:
        assert services[name]["build"] == ".", name
        assert isinstance(services[name]["command"], list), f"{name}: use the exec form"
    assert services["simulator"]["profiles"] == ["demo"]
    for name in ("postgres", "migrate", "etl"):
        assert "profiles" not in services[name], name

    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    volume = pg["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "postgres data must live in a named volume"
    check = pg["healthcheck"]["test"]
    assert check[0] == "CMD" and check[1] == "pg_isready"
    assert {("-U", "etl"), ("-d", "etl")} <= set(zip(check, check[1:], strict=False))

    migrate, daemon = services["migrate"], services["etl"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"  # quoted in YAML: a bare no would be False
    assert daemon["command"] == ["run"]
    assert daemon["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert daemon["restart"] == "unless-stopped"
    assert daemon["env_file"] == ["deploy/tokens.env"]


def test_build_services_run_commands_that_exist(services: dict[str, Any]) -> None:
    runner = CliRunner()
    for name in BUILD_SERVICES:
        args = [str(a) for a in services[name]["command"]]
        parse_cli(args)  # every option exists and every value has the right type
        words = command_words(args)
        result = runner.invoke(cli, [*words, "--help"])
        assert result.exit_code == 0, f"{name}: etl {' '.join(words)} --help: {result.output}"
    # The image's default command too.
    cmd = dict(dockerfile_instructions())["CMD"]
    assert command_words(exec_form(cmd)) == ["run"]


def test_simulator_flags(services: dict[str, Any]) -> None:
    args = [str(a) for a in services["simulator"]["command"]]
    ctx = parse_cli(args)
    assert ctx.info_name == "simulate"
    assert ctx.params["host"] == "0.0.0.0"  # reachable from the etl container
    assert ctx.params["port"] == 8080
    assert ctx.params["instances"] == 3
    assert ctx.params["chats"] == 100
    assert ctx.params["tick_seconds"] == 60
    assert re.fullmatch(r"[0-9a-f]{50}", ctx.params["token"])
    assert services["simulator"].get("init") is True  # `etl simulate` as PID 1 ignores SIGTERM


def test_compose_environment_names_are_the_ones_etl_reads(services: dict[str, Any]) -> None:
    for name in BUILD_SERVICES:
        for key in services[name].get("environment", {}):
            if key.startswith("ETL_"):
                assert key in (ENV_CONFIG, ENV_DATABASE_URL), f"{name}: etl never reads {key}"
    assert set(services["migrate"]["environment"]) == {ENV_DATABASE_URL}
    daemon = services["etl"]
    assert set(daemon["environment"]) == {ENV_CONFIG, ENV_DATABASE_URL}
    # ETL_CONFIG points at the read-only bind mount of deploy/etl.toml.
    source, target, mode = daemon["volumes"][0].split(":")
    assert (source, mode) == ("./deploy/etl.toml", "ro")
    assert daemon["environment"][ENV_CONFIG] == target == "/config/etl.toml"


def test_compose_database_url_is_the_postgres_service(services: dict[str, Any]) -> None:
    pg_env = services["postgres"]["environment"]
    urls = {services[n]["environment"][ENV_DATABASE_URL] for n in ("migrate", "etl")}
    assert len(urls) == 1, "migrate and etl must use the same database"
    urls_value = urls.pop()
    url = make_url(urls_value)
    assert url.drivername == "postgresql+psycopg"
    assert normalise_url(url.render_as_string(hide_password=False)) == urls_value
    assert url.host == "postgres" and url.host in services
    assert url.port == 5432
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.database == pg_env["POSTGRES_DB"]


def test_stop_grace_period_covers_the_shutdown_timeout(services: dict[str, Any]) -> None:
    grace = seconds(services["etl"]["stop_grace_period"])
    for path in (EXAMPLE_CONFIG, DEMO_CONFIG):
        _, cfg = load_toml(path)
        assert cfg.scheduler.shutdown_timeout_seconds + 10 <= grace, path.name


# -- deploy/ -----------------------------------------------------------------------------


def test_tokens_example_has_placeholders_only() -> None:
    env = read_env_file(TOKENS_EXAMPLE)
    production = {k: v for k, v in env.items() if k != "GREENAPI_DEMO_TOKEN"}
    assert production
    for key, value in production.items():
        assert key.startswith("GREENAPI_TOKEN_")
        assert value.startswith("replace-with-"), f"{key}: not an obvious placeholder"


def test_example_config_validates_and_resolves(
    monkeypatch: pytest.MonkeyPatch, isolated_secrets: None
) -> None:
    raw, cfg = load_toml(EXAMPLE_CONFIG)
    assert cfg.instances, "the example should show at least one instance"
    assert "database_url" not in raw  # compose sets ETL_DATABASE_URL; only a comment here
    assert cfg.defaults.allow_insecure_http is False
    for inst in cfg.instances:
        assert inst.api_url is not None and inst.api_url.startswith("https://")
        assert inst.api_token_env == f"GREENAPI_TOKEN_{inst.id_instance}"
        assert inst.api_token is None
    tokens = read_env_file(TOKENS_EXAMPLE)
    for key in tokens:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="is not set or empty"):
        resolve_instances(cfg, source=str(EXAMPLE_CONFIG))
    for key, value in tokens.items():
        monkeypatch.setenv(key, value)
    resolved = resolve_instances(cfg, source=str(EXAMPLE_CONFIG))
    assert [i.id_instance for i in resolved] == [i.id_instance for i in cfg.instances]
    for instance in resolved:
        token = instance.token.get_secret_value()
        assert token == tokens[f"GREENAPI_TOKEN_{instance.id_instance}"]


def test_demo_config_matches_the_simulator_service(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, isolated_secrets: None
) -> None:
    _, cfg = load_toml(DEMO_CONFIG)
    sim = parse_cli([str(a) for a in services["simulator"]["command"]]).params
    # http://simulator:8080: the compose service name and the port `etl simulate` binds.
    url = f"http://simulator:{sim['port']}"
    assert "simulator" in services
    assert cfg.defaults.api_url == url
    assert all(i.api_url is None for i in cfg.instances)
    # Plain http to a non-loopback host needs the explicit opt-in the demo config sets.
    with pytest.raises(ValueError, match="allow_insecure_http"):
        check_api_url(url, allow_insecure_http=False)
    assert cfg.defaults.allow_insecure_http is True
    # The instances the simulator serves (ids from Simulator's default first_id).
    expected = Simulator(instances=sim["instances"]).instance_ids
    assert [i.id_instance for i in cfg.instances] == expected
    # Their token comes from tokens.env, and is the one the simulator accepts.
    tokens = read_env_file(TOKENS_EXAMPLE)
    assert {i.api_token_env for i in cfg.instances} == {"GREENAPI_DEMO_TOKEN"}
    assert tokens["GREENAPI_DEMO_TOKEN"] == sim["token"]
    for key, value in tokens.items():
        monkeypatch.setenv(key, value)
    resolved = resolve_instances(cfg, source=str(DEMO_CONFIG))
    assert {i.token.get_secret_value() for i in resolved} == {sim["token"]}
    assert {i.api_url for i in resolved} == {url}


# -- Dockerfile and .dockerignore --------------------------------------------------------


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    args = dict(instructions)  # the last of each kind
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert names.count("FROM") == 1

    env: dict[str, str] = {}
    for name, value in instructions:
        if name == "ENV":
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
    assert env.get("PYTHONUNBUFFERED") == "1"

    workdir = args["WORKDIR"]
    copied: dict[str, str] = {}
    for name, value in instructions:
        if name == "COPY":
            assert not value.startswith("--from"), "single-stage build expected"
            *sources, dest = exec_form(value) if value.startswith("[") else value.split()
            target = dest if dest.startswith("/") else f"{workdir}/{dest}"
            for src in sources:
                copied[src.rstrip("/")] = os.path.normpath(target)
    assert set(copied) >= IMAGE_PATHS
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    # Copied as in the repository, alembic.ini in the WORKDIR: `alembic upgrade head` works.
    assert copied["alembic.ini"] == os.path.normpath(workdir)
    for directory in ("etl", "migrations"):
        assert copied[directory] == os.path.normpath(f"{workdir}/{directory}")

    # The wheel carries migrations/ and alembic.ini: install it like users do, not editable.
    install = [v for n, v in instructions if n == "RUN" and "pip install" in v]
    assert len(install) == 1
    assert "[postgres]" in install[0]
    assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", install[0])

    users = [v for n, v in instructions if n == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")
    assert exec_form(args["ENTRYPOINT"]) == ["etl"]
    assert exec_form(args["CMD"]) == ["run"]
    assert args["STOPSIGNAL"] == "SIGTERM"


def test_dockerignore_keeps_what_the_image_needs_and_drops_secrets() -> None:
    needed = ["pyproject.toml", "README.md", "alembic.ini"]
    for directory in ("etl", "migrations"):
        for path in sorted((ROOT / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                needed.append(path.relative_to(ROOT).as_posix())
    assert "etl/py.typed" in needed and "migrations/script.py.mako" in needed
    kept_out = [p for p in needed if dockerignore_excludes(p)]
    assert not kept_out, f".dockerignore excludes files the image needs: {kept_out}"
    for secret in (
        "deploy/tokens.env",
        "deploy/etl.toml",
        "etl.toml",
        "chats.db",
        ".venv/bin/python",
        ".git/config",
        "etl/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(secret), f".dockerignore lets {secret} into the context"


# -- the compose commands, run for real (no Docker) ---------------------------------------


def _etl_command() -> list[str]:
    script = Path(sys.executable).with_name("etl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "etl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _scalar(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


@pytest.fixture
def compose_database(pg_admin: Engine) -> Iterator[str]:
    """The compose ETL_DATABASE_URL pointed at a throwaway database of the test server."""
    assert PG_URL
    admin = make_url(normalise_url(PG_URL))
    name = f"etl_deploy_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        compose_url = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["etl"][
            "environment"
        ][ENV_DATABASE_URL]
        url = make_url(compose_url).set(
            host=admin.host,
            port=admin.port,
            username=admin.username,
            password=admin.password,
            database=name,
        )
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.postgres
@pytest.mark.slow
def test_compose_services_commands_end_to_end(
    services: dict[str, Any], compose_database: str, tmp_path: Path
) -> None:
    """postgres -> migrate -> simulator -> etl, as compose runs them, minus the containers:
    the services' commands and environment, the demo config and tokens.env.example."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
    base_env["PYTHONUNBUFFERED"] = "1"
    workdir = tmp_path / "app"  # like the image's WORKDIR: no etl.toml in it
    workdir.mkdir()

    def etl_env(service: str, **replace: str) -> dict[str, str]:
        env = dict(base_env)
        for path in services[service].get("env_file", []):
            example = ROOT / (path + ".example")
            env.update(read_env_file(example))
        env.update({k: str(v) for k, v in services[service].get("environment", {}).items()})
        env.update(replace)
        return env

    def run(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        args = [str(a) for a in services[service]["command"]]
        if service == "etl":
            args = ["sync", "--once"]  # one pass of what `run` does every interval
        return subprocess.run(
            [*_etl_command(), *args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    # migrate: `etl db upgrade`, twice (every `docker compose up` runs it again).
    migrate_env = etl_env("migrate", ETL_DATABASE_URL=compose_database)
    for _ in range(2):
        done = run("migrate", migrate_env)
        assert done.returncode == 0, done.stderr
    assert "is at revision" in done.stdout

    # simulator: the compose command, on loopback and a free port.
    sim_args = [str(a) for a in services["simulator"]["command"]]
    sim_args[sim_args.index("--host") + 1] = "127.0.0.1"
    port = _free_port()
    sim_args[sim_args.index("--port") + 1] = str(port)
    token = option_value(sim_args, "--token")
    sim_log = (tmp_path / "simulator.log").open("w")
    sim_proc = subprocess.Popen(
        [*_etl_command(), *sim_args],
        cwd=workdir,
        env=base_env,
        stdout=sim_log,
        stderr=subprocess.STDOUT,
    )
    daemon: subprocess.Popen[bytes] | None = None
    engine = make_engine(compose_database)
    try:
        sim_url = f"http://127.0.0.1:{port}"

        def simulator_up() -> bool:
            assert sim_proc.poll() is None, (tmp_path / "simulator.log").read_text()
            try:
                r = requests.get(f"{sim_url}/waInstance1101000001/getChats/{token}", timeout=2)
            except requests.ConnectionError:
                return False
            return r.status_code == 200

        _wait_until(simulator_up, 30, "the simulator")

        # etl: the demo config with the service URL rewritten to the local simulator.
        demo = DEMO_CONFIG.read_text(encoding="utf-8")
        assert demo.count('"http://simulator:8080"') == 1
        config = tmp_path / "config" / "etl.toml"
        config.parent.mkdir()
        config.write_text(demo.replace('"http://simulator:8080"', f'"{sim_url}"'), "utf-8")
        env = etl_env("etl", ETL_CONFIG=str(config), ETL_DATABASE_URL=compose_database)

        done = run("etl", env)
        assert done.returncode == 0, done.stdout + done.stderr
        instances = int(option_value(sim_args, "--instances"))
        chats = int(option_value(sim_args, "--chats"))
        assert _scalar(engine, "SELECT COUNT(*) FROM instances") == instances
        assert _scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'") == instances
        assert _scalar(engine, "SELECT COUNT(*) FROM chats") == instances * chats

        # etl: the daemon itself, then `docker stop` (SIGTERM) within the grace period.
        daemon_log = tmp_path / "daemon.log"
        with daemon_log.open("w") as log_file:
            daemon = subprocess.Popen(
                [*_etl_command(), *[str(a) for a in services["etl"]["command"]]],
                cwd=workdir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        runs_before = _scalar(engine, "SELECT COUNT(*) FROM sync_runs")

        def daemon_synced() -> bool:
            assert daemon is not None and daemon.poll() is None, daemon_log.read_text()
            return bool(_scalar(engine, "SELECT COUNT(*) FROM sync_runs") > runs_before)

        _wait_until(daemon_synced, 60, "a sync by `etl run`")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=seconds(services["etl"]["stop_grace_period"]))
        output = daemon_log.read_text()
        assert code == 0, output
        assert "signal SIGTERM" in output
        assert token not in output
    finally:
        engine.dispose()
        for proc in (daemon, sim_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        sim_log.close()


def test_grafana_service_mounts_the_provisioning_and_reaches_postgres(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    for host_path in mounts.values():
        assert (ROOT / host_path).is_dir(), host_path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()
    assert grafana["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    ds = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/postgres.yml").read_text("utf-8")
    )["datasources"][0]
    pg_env = services["postgres"]["environment"]
    assert ds["url"] == "postgres:5432"
    assert ds["user"] == pg_env["POSTGRES_USER"]
    assert ds["secureJsonData"]["password"] == pg_env["POSTGRES_PASSWORD"]
    assert ds["jsonData"]["database"] == pg_env["POSTGRES_DB"]
    board = json.loads((ROOT / "deploy/grafana/dashboards/chatsync.json").read_text("utf-8"))
    uids = {
        (t.get("datasource") or p.get("datasource") or {}).get("uid")
        for p in board["panels"]
        for t in p.get("targets", [])
    }
    assert uids == {ds["uid"]}


@pytest.mark.parametrize("config_name", ["etl.example.toml", "etl.demo.toml"])
def test_daemon_http_port_is_published_and_health_checked(
    services: dict[str, dict[str, Any]], config_name: str
) -> None:
    etl_service = services["etl"]
    _, cfg = load_toml(ROOT / "deploy" / config_name)
    assert cfg.http.enabled and cfg.http.host == "0.0.0.0"
    published = {p.rsplit(":", 1)[1] for p in etl_service["ports"]}
    assert str(cfg.http.port) in published
    assert all(p.startswith("127.0.0.1:") for p in etl_service["ports"])  # not on every NIC
    probe = " ".join(etl_service["healthcheck"]["test"])
    assert f"127.0.0.1:{cfg.http.port}/healthz" in probe

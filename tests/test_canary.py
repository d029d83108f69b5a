"""The API token never leaks: logs (urllib3 DEBUG included), exceptions, database, CLI output.

Every instance here uses the canary token ``CANARY``; each error path is driven for real
over HTTP and everything observable is searched for the token.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from etl.client import GreenApiClient
from etl.config import load_config
from etl.errors import ConfigError, EtlError
from etl.payload import decode_chats
from etl.redact import RedactingFilter, redact, register_secret
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import CANARY, make_instance

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_ID = 1101999999


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_path(iid: int) -> bytes:
    return f"Cannot GET /waInstance{iid}/getChats/{CANARY}".encode()


# name -> (fault factory taking the instance id, instance overrides)
CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "ok": (None, {}),
    "ok-count": (None, {"count": 5}),
    "400-starting": (
        lambda i: Fault(status=400, body=b"instance in starting process try later"),
        {},
    ),
    "400-not-authorized": (
        lambda i: Fault(status=400, body=b"instance account not authorized"),
        {},
    ),
    "400-expired": (lambda i: Fault(status=400, body=b"Instance account is expired"), {}),
    "400-deleted": (lambda i: Fault(status=400, body=b"Instance is deleted"), {}),
    "400-bad-request": (lambda i: Fault(status=400), {}),
    "401": (lambda i: Fault(status=401), {}),
    "403": (lambda i: Fault(status=403), {}),
    "403-unknown-instance": (None, {"id_instance": UNKNOWN_ID}),
    "404": (lambda i: Fault(status=404), {}),
    "466": (lambda i: Fault(status=466), {}),
    "429": (lambda i: Fault(status=429), {}),
    "429-retry-after": (lambda i: Fault(status=429, retry_after="0", times=1), {}),
    "499": (lambda i: Fault(status=499), {}),
    "500": (lambda i: Fault(status=500), {}),
    "502-html": (lambda i: Fault(status=502, mode="html"), {}),
    "503": (lambda i: Fault(status=503), {}),
    "504": (lambda i: Fault(status=504), {}),
    "reset": (lambda i: Fault(mode="reset"), {}),
    "truncate": (lambda i: Fault(mode="truncate"), {}),
    "html": (lambda i: Fault(mode="html"), {}),
    "object": (lambda i: Fault(mode="object"), {}),
    "empty": (lambda i: Fault(mode="empty"), {}),
    "timeout": (lambda i: Fault(delay=0.6), {"timeout_seconds": 0.2}),
    "refused": (None, {"api_url": "closed"}),
    # hostile servers that echo the request path or the token back in the error body
    "echo-400": (lambda i: Fault(status=400, body=b"bad token " + CANARY.encode()), {}),
    "echo-404": (lambda i: Fault(status=404, body=echo_path(i)), {}),
    "echo-500": (lambda i: Fault(status=500, body=CANARY.encode()), {}),
    "echo-502-path": (lambda i: Fault(status=502, body=echo_path(i)), {}),
    "echo-466": (
        lambda i: Fault(
            status=466,
            body=json.dumps(
                {"invokeStatus": {"status": CANARY}, "correspondentsStatus": {"status": CANARY}}
            ).encode(),
        ),
        {},
    ),
    "echo-html-200": (
        lambda i: Fault(body=b"<html>" + echo_path(i) + b"</html>", content_type="text/html"),
        {},
    ),
}


def canary_instance(sim: Simulator, name: str, port: int) -> Any:
    factory, overrides = CASES[name]
    overrides = {"max_attempts": 2, **overrides, "token": CANARY}
    if overrides.get("api_url") == "closed":
        overrides["api_url"] = f"http://127.0.0.1:{port}"
    iid = overrides.pop("id_instance", sim.instance_ids[0])
    inst = make_instance(sim, iid, **overrides)
    sim.set_fault(iid, factory(iid) if factory else None)
    return inst


def assert_clean(label: str, *texts: object) -> None:
    for value in texts:
        assert CANARY not in str(value), f"{label}: token leaked in {value!r}"[:2000]


def check_exception(label: str, exc: BaseException) -> None:
    formatted = "".join(traceback.format_exception(exc))
    assert_clean(label, str(exc), repr(exc), formatted, exc.args)
    if isinstance(exc, EtlError):
        assert_clean(label, getattr(exc, "message", ""))


def check_records(label: str, caplog: pytest.LogCaptureFixture) -> None:
    assert_clean(f"{label} caplog.text", caplog.text)
    formatter = logging.Formatter("%(name)s %(message)s")
    for record in caplog.records:
        where = f"{label} record {record.name}"
        assert_clean(where, record.getMessage())
        if record.exc_info:
            assert_clean(where, formatter.formatException(record.exc_info))
        assert_clean(where, record.exc_text or "", formatter.format(record), repr(record.args))
        assert_clean(where, caplog.handler.format(record))


def dump_database(engine: Engine) -> list[tuple[str, tuple[Any, ...]]]:
    """Every row of every table and view, as (name, row)."""
    insp = inspect(engine)
    names = insp.get_table_names() + insp.get_view_names()
    out: list[tuple[str, tuple[Any, ...]]] = []
    with engine.connect() as conn:
        for name in names:
            for row in conn.execute(text(f'SELECT * FROM "{name}"')):
                out.append((name, tuple(row)))
    assert {"sync_runs", "instances", "chats"} <= set(names)
    return out


def assert_database_clean(engine: Engine) -> None:
    for name, row in dump_database(engine):
        for value in row:
            if isinstance(value, bytes | bytearray | memoryview):
                value = bytes(value).decode("utf-8", "replace")
            assert_clean(f"table {name}", value)


# -- in process: client exceptions and logs ----------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_client_paths_never_show_the_token(
    canary_sim: Simulator,
    fast_client: GreenApiClient,
    debug_logs: pytest.LogCaptureFixture,
    name: str,
) -> None:
    inst = canary_instance(canary_sim, name, closed_port())
    assert_clean("instance repr", repr(inst), str(inst))
    raised: list[BaseException] = []
    try:
        result = fast_client.get_chats(inst)
    except EtlError as exc:
        raised.append(exc)
    else:
        try:
            decode_chats(result.body)
        except EtlError as exc:
            raised.append(exc)
        assert_clean("fetch result", repr(result.attempts), result.http_status)
    for exc in raised:
        check_exception(name, exc)
    check_records(name, debug_logs)
    # the risky lines were really produced and captured (else this test proves nothing)
    urllib3_lines = [r.getMessage() for r in debug_logs.records if r.name.startswith("urllib3")]
    assert urllib3_lines, "no urllib3 DEBUG record captured"
    if name not in ("refused", "timeout"):  # no response line without a response
        assert any("/waInstance" in line and "***" in line for line in urllib3_lines)
    expect_failure = name not in ("ok", "ok-count", "429-retry-after", "empty")
    assert bool(raised) == expect_failure


def test_retry_warnings_never_show_the_token(
    canary_sim: Simulator, fast_client: GreenApiClient, debug_logs: pytest.LogCaptureFixture
) -> None:
    inst = canary_instance(canary_sim, "echo-502-path", closed_port())
    with pytest.raises(EtlError) as info:
        fast_client.get_chats(inst)
    check_exception("502", info.value)
    warnings = [r for r in debug_logs.records if r.name == "etl.client"]
    assert warnings and all("retrying" in r.getMessage() for r in warnings)
    check_records("502", debug_logs)


def test_logged_exception_with_traceback_is_redacted(
    canary_sim: Simulator, fast_client: GreenApiClient, debug_logs: pytest.LogCaptureFixture
) -> None:
    # Someone logging a failure with exc_info must not print the token either.
    inst = canary_instance(canary_sim, "refused", closed_port())
    try:
        fast_client.get_chats(inst)
    except EtlError:
        logging.getLogger("etl.test").exception("sync failed")
    check_records("exc_info", debug_logs)
    assert any(r.name == "etl.test" for r in debug_logs.records)


# -- in process: every table, both backends ----------------------------------------------


def test_sync_runs_and_every_table_never_hold_the_token(
    canary_sim: Simulator,
    engine: Engine,
    fast_client: GreenApiClient,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    syncer = Syncer(engine, fast_client)
    port = closed_port()
    register_instances(
        engine,
        [
            make_instance(canary_sim, token=CANARY),
            make_instance(canary_sim, UNKNOWN_ID, token=CANARY),
        ],
    )
    kinds: set[str | None] = set()
    for name in CASES:
        inst = canary_instance(canary_sim, name, port)
        outcome = syncer.sync(inst)
        assert_clean(name, outcome.error, repr(outcome))
        kinds.add(outcome.error_kind)
        canary_sim.set_fault(canary_sim.instance_ids[0], None)
    # every family of error really happened
    assert {
        None,
        "starting",
        "not_authorized",
        "expired",
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "quota_exceeded",
        "rate_limited",
        "server_error",
        "connection",
        "timeout",
        "bad_payload",
        "empty_response",
    } <= kinds
    with engine.connect() as conn:
        errors = [r.error for r in conn.execute(text("SELECT error FROM sync_runs")) if r.error]
    assert any("***" in e for e in errors), "the hostile echoes were stored masked"
    assert_database_clean(engine)
    check_records("sync", debug_logs)


def test_state_and_link_requests_never_show_the_token(
    canary_sim: Simulator,
    engine: Engine,
    fast_client: GreenApiClient,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """getStateInstance (behind an ambiguous 400) and checkWhatsapp (linking an id switch)
    carry the token in their paths too: answered, failing, and echoing it back."""
    sim = canary_sim
    iid = sim.instance_ids[0]
    inst = make_instance(sim, iid, token=CANARY, link_requests_per_second=10.0)
    register_instances(engine, [inst])
    syncer = Syncer(engine, fast_client)
    outcomes = []
    # the state behind the ambiguous 400: answered, a 500 echoing the token, a refused one
    sim.set_state(iid, "notAuthorized")
    for fault in (None, Fault(status=500, body=CANARY.encode()), Fault(mode="reset")):
        sim.set_method_fault(iid, "getStateInstance", fault)
        outcomes.append(syncer.sync(inst))
    sim.set_state(iid, "authorized")
    assert syncer.sync(inst).status == "ok"
    # an id switch: checkWhatsapp answering, echoing the token, out of quota
    sim.set_lid_mode(iid)
    echo = f"bad /waInstance{iid}/checkWhatsapp/{CANARY}".encode()
    sim.set_method_fault(iid, "checkWhatsapp", Fault(status=400, body=echo, times=1))
    outcomes.append(syncer.sync(inst))
    sim.set_check_quota(iid, 1)
    outcomes.append(syncer.sync(inst))
    sim.set_check_quota(iid, None)
    outcomes.append(syncer.sync(inst))
    kinds = [o.error_kind for o in outcomes]
    assert kinds[:3] == ["not_authorized", "starting", "starting"], kinds
    assert "id_switch" in kinds and outcomes[-1].status == "ok", [o.error for o in outcomes]
    for o in outcomes:
        assert_clean("outcome", o.error, repr(o))
    assert sim.method_count("getStateInstance") == 3 and sim.method_count("checkWhatsapp") > 0
    assert_database_clean(engine)
    check_records("state and links", debug_logs)
    lines = [r.getMessage() for r in debug_logs.records if r.name.startswith("urllib3")]
    for method in ("getStateInstance", "checkWhatsapp"):
        assert any(f"/{method}/***" in line for line in lines), method


# -- the config loader -------------------------------------------------------------------


def write_config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "api_url",
    [
        "ftp://api.green-api.com",
        "api.green-api.com",
        f"https://api.green-api.com/?token={CANARY}",
        f"https://user:{CANARY}@api.green-api.com",
        f"ftp://user:{CANARY}@api.green-api.com",
        f"ftp://api.green-api.com/waInstance1101000001/getChats/{CANARY}",
        f"http://example.com/{CANARY}",
    ],
)
def test_bad_url_error_never_shows_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_url: str
) -> None:
    monkeypatch.setenv("CANARY_TOKEN", CANARY)
    cfg = write_config(
        tmp_path / "etl.toml",
        f"""
[[instances]]
id_instance = 1101000001
api_token_env = "CANARY_TOKEN"
api_url = {json.dumps(api_url)}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(cfg))
    assert "1101000001" in str(info.value) and "api_url" in str(info.value)
    check_exception("bad url", info.value)


def test_inline_token_with_a_bad_url_never_shows_the_token(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "etl.toml",
        f"""
[[instances]]
id_instance = 1101000001
api_token = "{CANARY}"
api_url = "ftp://x:{CANARY}@host"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(cfg))
    check_exception("inline", info.value)


def test_missing_env_var_error_never_shows_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANARY_TOKEN", CANARY)
    monkeypatch.delenv("MISSING_TOKEN", raising=False)
    cfg = write_config(
        tmp_path / "etl.toml",
        """
[[instances]]
id_instance = 1101000001
api_token_env = "CANARY_TOKEN"

[[instances]]
id_instance = 1101000002
api_token_env = "MISSING_TOKEN"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(cfg))
    assert "1101000002" in str(info.value) and "MISSING_TOKEN" in str(info.value)
    check_exception("missing env", info.value)


@pytest.mark.parametrize(
    "body",
    [
        f'[[instances]]\nid_instance = 1\napi_token = "{CANARY}',  # unterminated string
        f'[[instances]]\nid_instance = 1\napi_token = "{CANARY}"\napi_token_env = "X"',
        f'[[instances]]\nid_instance = "x"\napi_token = "{CANARY}"',
        f'[[instances]]\nid_instance = 1\napi_token = "{CANARY}"\ncount = "{CANARY}"',
        f'[[instances]]\nid_instance = 1\napi_token = "{CANARY}"\nsecret = "{CANARY}"',
        f'[[instances]]\nid_instance = 1\napi_token = ["{CANARY}"]',
        f'[defaults]\napi_url = "{CANARY}"\n[[instances]]\nid_instance = 1\napi_token = "{CANARY}"',
    ],
)
def test_invalid_config_errors_never_echo_values(tmp_path: Path, body: str) -> None:
    cfg = write_config(tmp_path / "etl.toml", body)
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(cfg))
    check_exception("invalid config", info.value)


# -- the command line, as a subprocess ---------------------------------------------------


def start_etl(args: Iterable[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "etl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_etl(
    args: Iterable[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return finish(start_etl(args, env, cwd))


def cli_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ETL_") and k not in ("PYTHONWARNINGS",)
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli_config(sim: Simulator, instances: list[tuple[int, str | None]]) -> str:
    lines = [
        "[defaults]",
        f'api_url = "{sim.url}"',
        "timeout_seconds = 0.3",
        "max_attempts = 2",
        "[scheduler]",
        "max_workers = 16",
    ]
    for iid, api_url in instances:
        lines += ["[[instances]]", f"id_instance = {iid}", 'api_token_env = "CHATSYNC_TOKEN"']
        if api_url:
            lines.append(f'api_url = "{api_url}"')
    return "\n".join(lines) + "\n"


CLI_FAULTS: list[tuple[Fault | None, str]] = [
    (None, "ok"),
    (Fault(status=401), "unauthorized"),
    (Fault(status=400, body=b"instance in starting process try later"), "starting"),
    (Fault(status=404, body=b"no route: /waInstance1/getChats/" + CANARY.encode()), "not_found"),
    (Fault(status=466), "quota_exceeded"),
    (Fault(status=500, body=CANARY.encode()), "server_error"),
    (Fault(status=429, retry_after="0"), "rate_limited"),
    (Fault(mode="reset"), "connection"),
    (Fault(mode="truncate"), "bad_payload"),
    (Fault(mode="html"), "bad_payload"),
    (Fault(delay=0.8), "timeout"),
]


def cli_outcomes(stdout: str) -> dict[int, str]:
    """instance id -> 'status kind' from the `sync --once` table."""
    out: dict[int, str] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            out[int(parts[0])] = f"{parts[1]} {parts[2]}"
    return out


def check_cli(label: str, proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_clean(f"{label} stdout", proc.stdout)
    assert_clean(f"{label} stderr", proc.stderr)


def test_cli_sync_once_never_prints_the_token(tmp_path: Path) -> None:
    env = cli_env(CHATSYNC_TOKEN=CANARY)
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    refused = closed_port()
    with (
        Simulator(instances=len(CLI_FAULTS), chats=15, seed=3, token=CANARY) as faulty,
        Simulator(instances=2, chats=15, seed=4, token=CANARY, first_id=1102000001) as clean,
    ):
        ids = faulty.instance_ids
        for iid, (fault, _) in zip(ids, CLI_FAULTS, strict=True):
            faulty.set_fault(iid, fault)
        config = tmp_path / "faulty.toml"
        instances: list[tuple[int, str | None]] = [(iid, None) for iid in ids]
        instances += [(UNKNOWN_ID, None), (1101999998, f"http://127.0.0.1:{refused}")]
        write_config(config, cli_config(faulty, instances))
        clean_config = write_config(
            tmp_path / "clean.toml", cli_config(clean, [(i, None) for i in clean.instance_ids])
        )
        common = ["--config", str(config), "--database-url", db_url]

        upgraded = run_etl([*common, "db", "upgrade"], env, tmp_path)
        assert upgraded.returncode == 0, upgraded.stderr
        check_cli("db upgrade", upgraded)

        # two passes at once (SQLite serialises their writes): DEBUG text against the faults
        # (one instance there is healthy), DEBUG JSON against a healthy simulator
        faulty_proc = start_etl([*common, "--log-level", "DEBUG", "sync", "--once"], env, tmp_path)
        clean_common = ["--config", str(clean_config), "--database-url", db_url]
        clean_args = ["--log-level", "DEBUG", "--log-format", "json", "sync", "--once"]
        ok_proc = start_etl([*clean_common, *clean_args], env, tmp_path)

        proc = finish(faulty_proc)
        check_cli("faulty sync", proc)
        assert proc.returncode == 1, proc.stderr[-3000:]
        got = cli_outcomes(proc.stdout)
        for iid, (_, kind) in zip(ids, CLI_FAULTS, strict=True):
            expected = "ok -" if kind == "ok" else f"failed {kind}"
            assert got.get(iid) == expected, (iid, kind, proc.stdout)
        assert got[UNKNOWN_ID] == "failed forbidden"
        assert got[1101999998] == "failed connection"
        # the dangerous urllib3 request lines were printed, masked
        assert "urllib3" in proc.stderr
        assert "/waInstance" in proc.stderr and "***" in proc.stderr

        ok = finish(ok_proc)
        check_cli("clean sync", ok)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert set(cli_outcomes(ok.stdout).values()) == {"ok -"}
        assert len(cli_outcomes(ok.stdout)) == 2
        assert '"logger": "urllib3.connectionpool"' in ok.stderr
        assert "/waInstance" in ok.stderr and "***" in ok.stderr

    engine = create_engine(db_url)
    try:
        assert_database_clean(engine)
        with engine.connect() as conn:
            runs = conn.execute(text("SELECT COUNT(*) FROM sync_runs")).scalar_one()
        assert runs == len(CLI_FAULTS) + 2 + 2
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "secret",
    ["k9", "tok en-with space", "x" * 120, "tab\tinside"],
    ids=["short", "space", "long", "tab"],
)
def test_redact_masks_secrets_of_any_length_or_shape_among_many(secret: str) -> None:
    for n in range(300):  # a fleet's worth of tokens registered before this one
        register_secret(f"fleet-token-{n:04d}-" + "a" * 30)
    register_secret(secret)
    for line in (
        f"before {secret} after",
        f"glued{secret}glued",
        f"{secret}",
        f"instance 1: ok received=500 x={secret}",
    ):
        masked = redact(line)
        assert secret not in masked, line
        assert "***" in masked
    assert redact("fleet-token-0042-" + "a" * 30) == "***"
    assert redact("nothing to hide here") == "nothing to hide here"


def test_a_record_seen_by_logger_and_handler_filters_is_masked_once_and_stays_masked() -> None:
    register_secret(CANARY)
    f = RedactingFilter()
    record = logging.LogRecord("etl.x", logging.INFO, __file__, 1, "got %s", (CANARY,), None)
    assert f.filter(record) and f.filter(record)
    assert CANARY not in record.getMessage()
    assert record.getMessage() == "got ***"

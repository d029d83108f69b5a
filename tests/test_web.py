"""The operations endpoint over real HTTP: /healthz follows the daemon's scheduler, /readyz the
database and its revision, the status page and /status.json (escaped, redacted, inline SVG,
no script), errors that never take the server down, and the wiring of `etl run` /
`etl sync --once`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from email.message import Message
from pathlib import Path
from subprocess import Popen

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from etl.cli import cli
from etl.client import GreenApiClient
from etl.db import make_engine, upgrade
from etl.errors import ERROR_KINDS, ErrorKind
from etl.metrics import Metrics
from etl.redact import register_secret
from etl.scheduler import Daemon
from etl.simulator import ChangeRates, Fault, Simulator
from etl.status import InstanceStatus
from etl.sync import Syncer, register_instances, utcnow
from etl.web import StatusServer, render_page
from tests.conftest import CANARY, make_instance
from tests.test_cli import etl_env, write_config
from tests.test_status import add_run

SVG = "{http://www.w3.org/2000/svg}"
#: for tests about the server itself, where the backend makes no difference
SQLITE_ONLY = pytest.mark.parametrize("engine", ["sqlite"], indirect=True)


def get(url: str, method: str = "GET") -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


# -- /healthz ---------------------------------------------------------------------------------


def test_healthz_follows_the_daemon(
    engine: Engine, sim: Simulator, fast_client: GreenApiClient
) -> None:
    fleet = [make_instance(sim, iid, interval_seconds=1) for iid in sim.instance_ids]
    register_instances(engine, fleet)
    metrics = Metrics()
    daemon = Daemon(
        syncer=Syncer(engine, fast_client),
        instances=fleet,
        max_workers=2,
        shutdown_timeout=10,
        metrics=metrics,
        liveness_seconds=0.2,
    )
    with StatusServer(engine, metrics=metrics, liveness=daemon.liveness, port=0) as server:
        status, _, body = get(f"{server.url}/healthz")
        assert (status, body) == (503, b"scheduler not running\n")
        daemon.start()
        try:
            status, _, body = get(f"{server.url}/healthz")
            assert status == 200, body
            deadline = time.monotonic() + 15
            while daemon.ticks < len(fleet) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert daemon.ticks >= len(fleet)
            status, _, body = get(f"{server.url}/metrics")
            assert status == 200
            assert re.search(rb'chatsync_syncs_total\{error_kind="",status="ok"\} [1-9]', body)
            # a scheduler whose jobs stop firing is not alive
            beat = daemon.beat_at
            daemon.beat_at = time.monotonic() - 60
            status, _, body = get(f"{server.url}/healthz")
            assert status == 503 and b"stalled" in body
            daemon.beat_at = beat
            time.sleep(0.5)  # the next beat
            assert get(f"{server.url}/healthz")[0] == 200
        finally:
            assert daemon.stop()
        status, _, body = get(f"{server.url}/healthz")
        assert (status, body) == (503, b"stopping\n")


# -- /readyz ----------------------------------------------------------------------------------


def test_readyz_needs_the_latest_revision(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with StatusServer(engine, port=0) as server:
            status, _, body = get(f"{server.url}/readyz")
            assert status == 503
            assert body.startswith(b"database at revision none, latest is ")
            upgrade(engine, "0004")
            status, _, body = get(f"{server.url}/readyz")
            assert status == 503 and b"at revision 0004" in body
            upgrade(engine)
            status, _, body = get(f"{server.url}/readyz")
            assert status == 200 and body.startswith(b"ready"), body
    finally:
        engine.dispose()


def test_readyz_when_the_database_is_down() -> None:
    engine = make_engine("postgresql://etl:pw-s3cret@127.0.0.1:1/nothing")  # nothing listens
    try:
        with StatusServer(engine, port=0) as server:
            status, _, body = get(f"{server.url}/readyz")
            assert status == 503
            assert body == b"database unavailable: OperationalError\n"
            status, _, body = get(f"{server.url}/")  # the page says so too, and survives
            assert status == 503 and b"pw-s3cret" not in body
            assert get(f"{server.url}/healthz")[0] == 200
    finally:
        engine.dispose()


# -- the status page ------------------------------------------------------------------------


HOSTILE_LABEL = "<script>alert('label')</script> & \"Co\""
HOSTILE_BODY = b"<script>alert('body')</script><img src=x onerror=alert(1)> denied"


@pytest.fixture
def page_data(engine: Engine, canary_sim: Simulator, fast_client: GreenApiClient) -> Engine:
    """Two instances on the canary-token simulator: one healthy with a hostile label, one
    failing with a hostile error body; an old row whose error holds the raw token."""
    ok_id, bad_id = canary_sim.instance_ids
    fleet = [
        make_instance(canary_sim, ok_id, label=HOSTILE_LABEL),
        make_instance(canary_sim, bad_id),
    ]
    register_instances(engine, fleet)
    canary_sim.set_fault(bad_id, Fault(status=403, body=HOSTILE_BODY))
    syncer = Syncer(engine, fast_client)
    for inst in fleet:
        syncer.sync(inst)
    # a row written by something that forgot to redact: the page masks it anyway
    add_run(
        engine,
        bad_id,
        utcnow() + timedelta(seconds=1),
        "failed",
        error_kind="forbidden",
        error=f"GET /waInstance{bad_id}/getChats/{CANARY}: <b>403</b> " + HOSTILE_BODY.decode(),
    )
    return engine


def test_status_page_escapes_redacts_and_draws_svg(
    page_data: Engine, canary_sim: Simulator
) -> None:
    register_secret(CANARY)
    ok_id, bad_id = canary_sim.instance_ids
    with StatusServer(page_data, port=0, cache_seconds=0) as server:
        status, headers, raw = get(f"{server.url}/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = raw.decode()
    assert CANARY not in page
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;label&#x27;)&lt;/script&gt; &amp; &quot;Co&quot;" in page
    assert "&lt;script&gt;alert(&#x27;body&#x27;)" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no external resource"

    # the whole page is well-formed XML, so every tag and attribute is where we put it
    root = ET.fromstring(page.split("\n", 1)[1])
    rows = root.findall(".//tbody/tr")
    assert len(rows) == 2
    text_of = {r: "".join(r.itertext()) for r in rows}
    failing, healthy = rows  # problems first
    assert str(bad_id) in text_of[failing] and "failed" in text_of[failing]
    assert "forbidden" in text_of[failing] and "***" in text_of[failing]
    assert str(ok_id) in text_of[healthy] and HOSTILE_LABEL in text_of[healthy]
    assert "20" in text_of[healthy]  # chats

    svg = root.find(f".//{SVG}svg")
    assert svg is not None and svg.get("viewBox")
    bars = svg.findall(f".//{SVG}rect[@class]")
    assert {b.get("class") for b in bars} >= {"bar ok", "bar failed"}
    assert svg.find(f"{SVG}polyline") is not None  # the duration line
    tips = [t.text or "" for t in svg.iter(f"{SVG}title")]
    assert any("2 failed" in t for t in tips), tips


def test_status_json_matches_the_page(page_data: Engine, canary_sim: Simulator) -> None:
    with StatusServer(page_data, port=0) as server:
        status, headers, raw = get(f"{server.url}/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(raw)
    assert CANARY.encode() not in raw
    assert doc["summary"] == {
        "instances": 2,
        "ok": 1,
        "anomaly": 0,
        "failed": 1,
        "never": 0,
        "disabled": 0,
    }
    by_id = {i["instance_id"]: i for i in doc["instances"]}
    ok_id, bad_id = canary_sim.instance_ids
    assert by_id[ok_id]["label"] == HOSTILE_LABEL and by_id[ok_id]["chats"] == 20
    assert by_id[bad_id]["consecutive_failures"] == 2


@SQLITE_ONLY
def test_errors_never_take_the_server_down(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with StatusServer(engine, port=0) as server:
        assert get(f"{server.url}/nope")[0] == 404
        assert get(f"{server.url}/metrics")[0] == 404  # no metrics given
        status, headers, body = get(f"{server.url}/healthz", method="HEAD")
        assert (status, body) == (200, b"") and int(headers["Content-Length"]) > 0

        def boom() -> None:
            raise RuntimeError(f"bug with {CANARY}")

        monkeypatch.setattr(server, "_statuses", boom)
        status, _, body = get(f"{server.url}/")
        assert status == 500 and CANARY.encode() not in body
        assert get(f"{server.url}/healthz")[0] == 200  # still serving
        # a client that hangs up mid-request does not hurt either
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        assert get(f"{server.url}/readyz")[0] == 200


def test_an_instance_held_by_an_id_switch_shows_its_kind_and_what_to_do(engine: Engine) -> None:
    """An instance whose chats switched to @lid ids that checkWhatsapp could not link (its
    quota used up) is held as an ``id_switch`` anomaly: its row on the status page says
    so, explains the kind on hover and says what to do; the healthy one beside it does
    not; no chat id is shown."""
    still = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)
    with Simulator(instances=2, chats=30, seed=5, rates=still) as sim:
        held_id, ok_id = sim.instance_ids
        fleet = [make_instance(sim, i, link_requests_per_second=5.0) for i in sim.instance_ids]
        register_instances(engine, fleet)
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        try:
            syncer = Syncer(engine, client)
            assert [syncer.sync(inst).status for inst in fleet] == ["ok", "ok"]
            sim.set_check_quota(held_id, 0)
            sim.set_lid_mode(held_id)
            outs = [syncer.sync(inst) for inst in fleet]
        finally:
            client.close()
        chat_ids = {str(c["id"]) for c in sim.chats(held_id)}
    assert [(o.status, o.error_kind) for o in outs] == [("anomaly", "id_switch"), ("ok", None)]
    with StatusServer(engine, port=0, cache_seconds=0) as server:
        status, _, raw = get(f"{server.url}/")
    assert status == 200
    page = raw.decode()
    assert not [c for c in chat_ids if c in page]
    root = ET.fromstring(page.split("\n", 1)[1])
    rows = {int(r.findtext(".//span[@class='id']") or 0): r for r in root.findall(".//tbody/tr")}
    held, healthy = rows[held_id], rows[ok_id]
    info = ERROR_KINDS[ErrorKind.ID_SWITCH]
    assert held.get("class") == "anomaly"
    assert held.findtext(".//span[@class='pill anomaly']") == "anomaly"
    kind = held.find(".//span[@class='kind']")
    assert kind is not None and (kind.text, kind.get("title")) == ("id_switch", info.cause)
    assert held.findtext(".//div[@class='action']") == f"what to do: {info.action}"
    assert "etl ids link" in info.action and "etl ids accept" in info.action
    assert healthy.get("class") == "ok" and healthy.find(".//div[@class='action']") is None


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def sim_config(tmp_path: Path, sim: Simulator) -> Path:
    return write_config(tmp_path / "etl.toml", sim)


@SQLITE_ONLY
def test_sync_once_serves_http_only_when_asked(sim_config: Path, engine: Engine) -> None:
    base = ["sync", "--once", "--config", str(sim_config), "--database-url", url_of(engine)]
    plain = CliRunner().invoke(cli, base, prog_name="etl")
    assert plain.exit_code == 0, plain.output
    assert "status page" not in plain.output
    served = CliRunner().invoke(cli, [*base, "--http-port", "0"], prog_name="etl")
    assert served.exit_code == 0, served.output
    assert re.search(r"status page and metrics on http://127\.0\.0\.1:\d+/", served.stderr)


@SQLITE_ONLY
def test_a_taken_port_is_logged_and_the_work_goes_on(sim_config: Path, engine: Engine) -> None:
    """Two replicas on one host and one port, say: the second syncs on without HTTP."""
    args = ["sync", "--once", "--config", str(sim_config), "--database-url", url_of(engine)]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, [*args, "--http-port", str(port)], prog_name="etl")
    assert result.exit_code == 0, result.output
    assert f"http: cannot listen on 127.0.0.1:{port} (" in result.stderr
    assert "running without the status page and metrics" in result.stderr
    assert len(result.stdout.splitlines()) == 4  # the outcome table: header + 3 instances


@pytest.fixture
def start_daemon(tmp_path: Path, sim_config: Path) -> Iterator[Callable[..., Popen[str]]]:
    """Starts `python -m etl run ARGS...` on a migrated SQLite database; kills leftovers."""
    url = f"sqlite:///{tmp_path / 'run.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    procs: list[Popen[str]] = []

    def start(*args: str) -> Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", *args],
            cwd=tmp_path,
            env=etl_env(ETL_DATABASE_URL=url),
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def wait_for_line(proc: Popen[str], pattern: str) -> re.Match[str]:
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"the process ended without printing {pattern!r}")


def test_run_serves_the_endpoints(
    start_daemon: Callable[..., Popen[str]],
) -> None:
    first = start_daemon("--http-port", "0")
    url = wait_for_line(first, r"status page and metrics on (http://\S+)/").group(1)
    deadline = time.monotonic() + 20
    while get(f"{url}/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(f"{url}/healthz")[0] == 200
    assert get(f"{url}/readyz")[0] == 200
    status, _, body = get(f"{url}/metrics")
    assert status == 200 and b"chatsync_instances 3.0" in body
    assert get(f"{url}/")[0] == 200

    first.terminate()
    assert first.wait(30) == 0


def test_the_error_kind_explains_itself_on_hover(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kind's ``title`` is its cause from ``ERROR_KINDS``, escaped; an unknown kind
    (written by another version, say) has none."""
    monkeypatch.setitem(
        ERROR_KINDS,
        ErrorKind.TIMEOUT,
        replace(ERROR_KINDS[ErrorKind.TIMEOUT], cause='<b>"slow"</b> & late'),
    )
    now = utcnow()

    def status(iid: int, kind: str) -> InstanceStatus:
        return InstanceStatus(
            instance_id=iid,
            label=f"i{iid}",
            enabled=True,
            last_run_at=now,
            last_status="failed",
            last_error_kind=kind,
            last_error="it failed",
            last_duration_ms=10,
            last_success_at=None,
            consecutive_failures=1,
            chats=0,
        )

    kinds = {1: "quota_exceeded", 2: "timeout", 3: "no_such_kind"}
    page = render_page([status(iid, kind) for iid, kind in kinds.items()], [], now=now)
    assert '<span class="kind" title="&lt;b&gt;&quot;slow&quot;&lt;/b&gt; &amp; late">' in page
    root = ET.fromstring(page.split("\n", 1)[1])
    titles = {
        row.findtext(".//span[@class='kind']"): row.find(".//span[@class='kind']").get("title")
        for row in root.findall(".//tbody/tr")
    }
    assert titles == {
        "quota_exceeded": ERROR_KINDS[ErrorKind.QUOTA_EXCEEDED].cause,
        "timeout": '<b>"slow"</b> & late',
        "no_such_kind": None,
    }

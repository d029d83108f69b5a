"""GreenApiClient against real HTTP: error mapping, retries, budgets, headers, redirects.

Every test talks to the simulator (or a throwaway ``http.server``) on loopback and counts
what the server actually received.
"""

from __future__ import annotations

import email.utils
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine

from etl import __version__
from etl.client import GreenApiClient, classify_400, parse_retry_after
from etl.config import Instance
from etl.errors import ApiError, PayloadError
from etl.payload import decode_chats
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import rows, table_counts

# -- helpers -----------------------------------------------------------------------------


def fetch_error(client: GreenApiClient, instance: Instance) -> ApiError:
    with pytest.raises(ApiError) as info:
        client.get_chats(instance)
    return info.value


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class Throwaway:
    url: str
    seen: list[Seen] = field(default_factory=list)


Reply = tuple[int, dict[str, str], bytes]


@contextmanager
def throwaway_server(reply: Callable[[str], Reply]) -> Iterator[Throwaway]:
    """A tiny loopback HTTP server that records every request's path and headers."""
    box: list[Throwaway] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            box[0].seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, headers, body = reply(self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box.append(Throwaway(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def drip_server(body: bytes, every: float) -> Iterator[str]:
    """Answers 200 with a correct Content-Length, then sends the body one byte at a time."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                if stop.wait(every):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the client hanging up mid-drip is the point

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def json_array(_path: str) -> Reply:
    return 200, {"Content-Type": "application/json"}, b'[{"id": "1@c.us"}]'


# -- errors that fail fast ---------------------------------------------------------------

FAIL_FAST = [
    pytest.param(400, b"instance in starting process try later", "starting", id="400-starting"),
    pytest.param(
        400, b'{"message":"instance in starting process try later"}', "starting", id="400-json"
    ),
    pytest.param(400, b"instance account not authorized", "not_authorized", id="400-not-auth"),
    pytest.param(400, b"Instance account is expired", "expired", id="400-expired"),
    pytest.param(400, b"Instance is deleted", "expired", id="400-deleted"),
    pytest.param(400, b"bad request data", "bad_request", id="400-bad-request"),
    pytest.param(400, b"Validation failed", "bad_request", id="400-validation"),
    pytest.param(400, b"", "bad_request", id="400-empty-body"),
    pytest.param(401, None, "unauthorized", id="401"),
    pytest.param(403, None, "forbidden", id="403"),
    pytest.param(404, None, "not_found", id="404"),
    pytest.param(466, None, "quota_exceeded", id="466"),
    pytest.param(405, None, "bad_request", id="405-other-4xx"),
    pytest.param(501, None, "server_error", id="501-not-retried"),
]


@pytest.mark.parametrize(("status", "body", "kind"), FAIL_FAST)
def test_non_retryable_errors_fail_fast(
    sim: Simulator, fast_client: GreenApiClient, status: int, body: bytes | None, kind: str
) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(status=status, body=body))
    t0 = time.monotonic()
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status, err.attempts) == (kind, status, 1)
    assert err.retryable is False
    assert sim.request_count(inst.id_instance) == 1
    assert time.monotonic() - t0 < 1.0
    assert f"HTTP {status}" in str(err) and "127.0.0.1" in str(err)


def test_quota_error_reports_the_body_statuses(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(status=466))  # the body of Green-API's docs
    err = fetch_error(fast_client, inst)
    assert err.error_kind == "quota_exceeded"
    assert "invokeStatus: method=getchats used=100 total=100 status=QUOTE_EXCEEDED" in str(err)
    assert (
        "correspondentsStatus: method=correspondents used=3 total=3 "
        "status=CORRESPONDENTS_QUOTE_EXCEEDED" in str(err)
    )
    # the descriptions list chat ids (personal data): never in the message
    assert "@c.us" not in str(err) and "tariff" not in str(err)


def test_quota_error_with_an_unexpected_body_still_fails_clearly(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim)
    body = b"quota exceeded for 79001234567@c.us, plain text"
    sim.set_fault(inst.id_instance, Fault(status=466, body=body))
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.attempts) == ("quota_exceeded", 1)
    # a body that is not the documented JSON is not echoed: it may list chat ids too
    assert "not the documented JSON" in str(err) and "79001234567" not in str(err)


def test_wrong_token_is_401_from_the_server(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim, token="f" * 50)
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status, err.attempts) == ("unauthorized", 401, 1)
    assert sim.request_count(inst.id_instance) == 1


def test_instance_the_server_does_not_know_is_403(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim, 1101999999)
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status, err.attempts) == ("forbidden", 403, 1)
    assert sim.request_count(1101999999) == 1


def test_retry_after_on_a_non_retryable_status_does_not_cause_a_retry(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(status=466, retry_after="0"))
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.attempts) == ("quota_exceeded", 1)
    assert sim.request_count(inst.id_instance) == 1


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("instance in starting process try later", "starting"),
        ("INSTANCE IN STARTING PROCESS TRY LATER", "starting"),
        ("instance account not authorized", "not_authorized"),
        ("Instance account is expired", "expired"),
        ("Instance is deleted", "expired"),
        ("bad request data", "bad_request"),
        ("", "bad_request"),
    ],
)
def test_classify_400(text: str, kind: str) -> None:
    assert classify_400(text) == kind


# -- transient errors are retried --------------------------------------------------------

RETRYABLE = [
    pytest.param(429, "rate_limited", id="429"),
    pytest.param(499, "server_error", id="499"),
    pytest.param(500, "server_error", id="500"),
    pytest.param(502, "server_error", id="502"),
    pytest.param(503, "server_error", id="503"),
    pytest.param(504, "server_error", id="504"),
]


@pytest.mark.parametrize(("status", "kind"), RETRYABLE)
@pytest.mark.parametrize("max_attempts", [4, 2])
def test_retryable_statuses_use_every_attempt(
    sim: Simulator, fast_client: GreenApiClient, status: int, kind: str, max_attempts: int
) -> None:
    inst = make_instance(sim, max_attempts=max_attempts)
    sim.set_fault(inst.id_instance, Fault(status=status))
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status, err.retryable) == (kind, status, True)
    assert err.attempts == max_attempts == sim.request_count(inst.id_instance)


def test_default_max_attempts_is_four(sim: Simulator, fast_client: GreenApiClient) -> None:
    from etl.config import Defaults

    assert Defaults().max_attempts == 4
    inst = make_instance(sim, max_attempts=Defaults().max_attempts)
    sim.set_fault(inst.id_instance, Fault(status=502))
    assert fetch_error(fast_client, inst).attempts == 4 == sim.request_count(inst.id_instance)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(status=502, times=2), id="502"),
        pytest.param(Fault(status=429, times=2), id="429"),
        pytest.param(Fault(status=499, times=2), id="499"),
        pytest.param(Fault(mode="reset", times=2), id="reset"),
    ],
)
def test_transient_failures_then_success(
    sim: Simulator, fast_client: GreenApiClient, fault: Fault
) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, fault)
    result = fast_client.get_chats(inst)
    assert (result.http_status, result.attempts) == (200, 3)
    assert sim.request_count(inst.id_instance) == 3
    assert len(decode_chats(result.body).chats) == 30


def test_retry_after_is_honoured(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(status=429, retry_after="1", times=1))
    result = fast_client.get_chats(inst)
    assert result.attempts == 2
    first, second = sim.requests
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.9


def test_without_retry_after_the_backoff_is_short(sim: Simulator) -> None:
    # the waits the client asks for (recorded, not slept), not the gaps between requests,
    # which a loaded machine stretches: its own backoff, at most backoff_max plus one base
    # step of jitter, not some default Retry-After
    sleeps: list[float] = []
    client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05, sleep=sleeps.append)
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(status=429, times=3))
    try:
        result = client.get_chats(inst)
    finally:
        client.close()
    assert result.attempts == 4
    assert len(sleeps) == 3 and max(sleeps) <= 0.05 + 0.01, sleeps


def test_retry_after_beyond_the_budget_gives_up_at_once(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim, interval_seconds=2)
    sim.set_fault(inst.id_instance, Fault(status=429, retry_after="30"))
    t0 = time.monotonic()
    err = fetch_error(fast_client, inst)
    assert time.monotonic() - t0 < 1.0
    assert (err.error_kind, err.attempts) == ("rate_limited", 1)
    assert sim.request_count(inst.id_instance) == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after(" 2 ") == 2.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (parse_retry_after(future) or 0) <= 10.5
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after(past) == 0.0


# -- network failures --------------------------------------------------------------------


def test_read_timeout_is_retried(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim, timeout_seconds=0.3, max_attempts=2)
    sim.set_fault(inst.id_instance, Fault(delay=5.0))  # the simulator's stop ends the wait
    t0 = time.monotonic()
    err = fetch_error(fast_client, inst)
    elapsed = time.monotonic() - t0
    assert (err.error_kind, err.http_status, err.attempts) == ("timeout", None, 2)
    assert sim.request_count(inst.id_instance) == 2
    # two 0.3 s timeouts at least; an attempt that waited for the answer takes 5 s
    assert 0.55 <= elapsed < 3.0


def test_slow_but_within_timeout_is_fine(sim: Simulator, fast_client: GreenApiClient) -> None:
    # a 0.3 s answer well within the 5 s timeout, however loaded the machine
    inst = make_instance(sim, timeout_seconds=5.0)
    sim.set_fault(inst.id_instance, Fault(delay=0.3, times=1))
    assert fast_client.get_chats(inst).attempts == 1


def test_connection_refused(sim: Simulator, fast_client: GreenApiClient) -> None:
    port = closed_port()
    inst = make_instance(sim, api_url=f"http://127.0.0.1:{port}")
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status, err.retryable) == ("connection", None, True)
    assert err.attempts == 4
    assert f"127.0.0.1:{port}" in str(err)
    assert sim.request_count() == 0


def test_connection_reset_mid_body(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(mode="reset"))
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.http_status) == ("connection", None)
    assert err.attempts == 4 == sim.request_count(inst.id_instance)


def test_truncated_body_is_returned_and_rejected_by_the_decoder(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    # The truncated answer is well-formed HTTP (Content-Length matches), so the client
    # cannot tell; the decoder must.
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(mode="truncate"))
    result = fast_client.get_chats(inst)
    assert (result.http_status, result.attempts) == (200, 1)
    with pytest.raises(PayloadError) as info:
        decode_chats(result.body)
    assert info.value.error_kind == "bad_payload"


@pytest.mark.parametrize("mode", ["html", "object"])
def test_200_with_a_non_array_body_is_bad_payload(
    sim: Simulator, fast_client: GreenApiClient, mode: str
) -> None:
    inst = make_instance(sim)
    sim.set_fault(inst.id_instance, Fault(mode=mode))
    result = fast_client.get_chats(inst)
    assert result.attempts == 1
    with pytest.raises(PayloadError):
        decode_chats(result.body)


def test_502_html_error_page_is_retried_and_summarised(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim, max_attempts=2)
    sim.set_fault(inst.id_instance, Fault(status=502, mode="html"))
    err = fetch_error(fast_client, inst)
    assert (err.error_kind, err.attempts) == ("server_error", 2)
    assert "\n" not in str(err) and len(str(err)) < 300


@pytest.mark.parametrize(("retry_after", "retried"), [("75", True), ("85", False)])
def test_total_time_budget_is_80_percent_of_the_interval(
    sim: Simulator, retry_after: str, retried: bool
) -> None:
    """At a 100 s interval the budget is 80 s: a Retry-After of 75 s fits in it (waited
    for: recorded, not slept), one of 85 s does not (the fetch ends at once). No clock is
    read but the client's own, and the first answer has 5 s to spare either way."""
    sleeps: list[float] = []
    client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05, sleep=sleeps.append)
    inst = make_instance(sim, interval_seconds=100)
    sim.set_fault(inst.id_instance, Fault(status=429, retry_after=retry_after, times=1))
    try:
        if retried:
            assert client.get_chats(inst).attempts == 2
            assert sleeps == [75.0]
        else:
            err = fetch_error(client, inst)
            assert (err.error_kind, err.attempts) == ("rate_limited", 1)
            assert sleeps == []
    finally:
        client.close()


def test_total_time_budget_bounds_the_retries(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim, interval_seconds=2, timeout_seconds=1.0, max_attempts=10)
    sim.set_fault(inst.id_instance, Fault(delay=1.5))
    t0 = time.monotonic()
    err = fetch_error(fast_client, inst)
    elapsed = time.monotonic() - t0
    assert err.error_kind == "timeout"
    # the 1.6 s budget ends the retries (and cuts the last attempt: see the explicit budget
    # below); ten attempts of 1 s would take over 10 s. The margin is for a loaded machine
    assert elapsed < 4.0, f"gave up after {elapsed:.2f}s; the budget is 1.6s"
    assert err.attempts in (1, 2)
    assert sim.request_count(inst.id_instance) == err.attempts


def test_a_trickling_body_cannot_outlast_the_budget(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    # Every byte arrives well within the read timeout, but the whole body would take 6 s.
    body = b"[" + b" " * 28 + b"]"
    with drip_server(body, every=0.2) as url:
        inst = make_instance(sim, api_url=url, interval_seconds=2, timeout_seconds=1.0)
        t0 = time.monotonic()
        err = fetch_error(fast_client, inst)
        elapsed = time.monotonic() - t0
    # cut at the 1.6 s budget, not after the 6 s body; the margin is for a loaded machine
    assert elapsed < 4.0, f"gave up after {elapsed:.2f}s; the budget is 1.6s"
    assert (err.error_kind, err.http_status) == ("timeout", None)


def test_explicit_budget_overrides_the_interval(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(sim, timeout_seconds=5.0)
    sim.set_fault(inst.id_instance, Fault(delay=10.0))  # the simulator's stop ends the wait
    t0 = time.monotonic()
    with pytest.raises(ApiError) as info:
        fast_client.get_chats(inst, budget_seconds=0.4)
    # the running attempt is cut at the 0.4 s budget, not at its 5 s read timeout (nor
    # after the 10 s answer); the margin is for a loaded machine
    assert time.monotonic() - t0 < 2.5
    assert info.value.error_kind == "timeout"


# -- what goes on the wire ---------------------------------------------------------------


def test_user_agent_accept_and_count_query(sim: Simulator, fast_client: GreenApiClient) -> None:
    with throwaway_server(json_array) as srv:
        inst = make_instance(sim, api_url=srv.url, count=7)
        result = fast_client.get_chats(inst)
    assert result.body == b'[{"id": "1@c.us"}]'
    [seen] = srv.seen
    token = inst.token.get_secret_value()
    assert seen.path == f"/waInstance{inst.id_instance}/getChats/{token}?count=7"
    ua = seen.headers["user-agent"]
    assert "chatsync" in ua and __version__ in ua
    assert "python-requests" not in ua
    assert seen.headers["accept"] == "application/json"


def test_no_count_means_no_query_string(sim: Simulator, fast_client: GreenApiClient) -> None:
    with throwaway_server(json_array) as srv:
        inst = make_instance(sim, api_url=srv.url)
        fast_client.get_chats(inst)
    [seen] = srv.seen
    assert "?" not in seen.path and seen.path.endswith(inst.token.get_secret_value())


def test_count_reaches_the_simulator(sim: Simulator, fast_client: GreenApiClient) -> None:
    inst = make_instance(sim, count=5)
    result = fast_client.get_chats(inst)
    assert len(decode_chats(result.body).chats) == 5
    [req] = sim.requests
    assert (req.count, req.served, req.status) == (5, 5, 200)


def test_trailing_slash_in_api_url_does_not_double(
    sim: Simulator, fast_client: GreenApiClient
) -> None:
    # config strips it; the path must still be exactly what Green-API expects
    with throwaway_server(json_array) as srv:
        inst = make_instance(sim, api_url=srv.url)
        fast_client.get_chats(inst)
    assert srv.seen[0].path.startswith(f"/waInstance{inst.id_instance}/getChats/")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(
    sim: Simulator, fast_client: GreenApiClient, status: int
) -> None:
    with throwaway_server(json_array) as target:

        def redirect(path: str) -> Reply:
            return status, {"Location": f"{target.url}{path}"}, b""

        with throwaway_server(redirect) as origin:
            inst = make_instance(sim, api_url=origin.url)
            err = fetch_error(fast_client, inst)
    assert len(origin.seen) == 1
    assert target.seen == []
    assert (err.http_status, err.attempts, err.retryable) == (status, 1, False)
    assert err.error_kind != "ok"


# -- through the syncer: the sync_runs row -----------------------------------------------

SYNC_CASES: list[tuple[str, Fault | None, dict[str, Any], tuple[Any, ...]]] = [
    # name, fault, instance overrides, (status, error_kind, http_status, attempts)
    ("401", Fault(status=401), {}, ("failed", "unauthorized", 401, 1)),
    ("403", Fault(status=403), {}, ("failed", "forbidden", 403, 1)),
    ("404", Fault(status=404), {}, ("failed", "not_found", 404, 1)),
    ("466", Fault(status=466), {}, ("failed", "quota_exceeded", 466, 1)),
    (
        "starting",
        Fault(status=400, body=b"instance in starting process try later"),
        {},
        ("failed", "starting", 400, 1),
    ),
    (
        "not-authorized",
        Fault(status=400, body=b"instance account not authorized"),
        {},
        ("failed", "not_authorized", 400, 1),
    ),
    ("expired", Fault(status=400, body=b"Instance is deleted"), {}, ("failed", "expired", 400, 1)),
    ("bad-request", Fault(status=400), {}, ("failed", "bad_request", 400, 1)),
    ("502", Fault(status=502), {}, ("failed", "server_error", 502, 4)),
    ("429-max2", Fault(status=429), {"max_attempts": 2}, ("failed", "rate_limited", 429, 2)),
    ("reset", Fault(mode="reset"), {}, ("failed", "connection", None, 4)),
    ("truncate", Fault(mode="truncate"), {}, ("failed", "bad_payload", 200, 1)),
    ("html", Fault(mode="html"), {}, ("failed", "bad_payload", 200, 1)),
    ("object", Fault(mode="object"), {}, ("failed", "bad_payload", 200, 1)),
    (
        "timeout",
        Fault(delay=0.6),
        {"timeout_seconds": 0.2, "max_attempts": 2},
        ("failed", "timeout", None, 2),
    ),
    ("refused", None, {"api_url": "closed"}, ("failed", "connection", None, 4)),
    # last: a transient failure that recovers, and the only tick that stores chats
    ("503-then-ok", Fault(status=503, times=2), {}, ("ok", None, 200, 3)),
]


def test_sync_records_each_failure_and_stores_nothing(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient
) -> None:
    syncer = Syncer(engine, fast_client)
    iid = sim.instance_ids[0]
    register_instances(engine, [make_instance(sim)])
    port = closed_port()
    for name, fault, overrides, expected in SYNC_CASES:
        if overrides.get("api_url") == "closed":
            overrides = {**overrides, "api_url": f"http://127.0.0.1:{port}"}
        inst = make_instance(sim, **overrides)
        sim.reset_counts()
        sim.set_fault(iid, fault)
        out = syncer.sync(inst)
        sim.set_fault(iid, None)
        run = rows(engine, "SELECT * FROM sync_runs ORDER BY id DESC")[0]
        got = (run.status, run.error_kind, run.http_status, run.attempts)
        assert got == expected, name
        assert (out.status, out.error_kind, out.http_status, out.attempts) == expected, name
        assert run.id == out.sync_run_id, name
        assert run.instance_id == iid and run.finished_at is not None, name
        if expected[0] == "failed":
            assert run.error, name
            assert (run.chats_received, run.chats_inserted) == (0, 0), name
            counts = table_counts(engine)
            assert (counts["chats"], counts["chat_ephemeral_history"]) == (0, 0), name
        if fault is not None or name == "refused":
            sent = sim.request_count(iid)
            assert sent == (0 if name == "refused" else expected[3]), name
    assert table_counts(engine)["sync_runs"] == len(SYNC_CASES)
    assert table_counts(engine)["chats"] == 30


def test_interrupt_stops_further_retries(sim) -> None:
    """At shutdown the client stops retrying instead of firing every remaining attempt."""
    import threading

    client = GreenApiClient(backoff_initial=0.5, backoff_max=1.0)
    inst = make_instance(sim, max_attempts=6)
    sim.set_fault(inst.id_instance, Fault(status=503))
    threading.Timer(0.2, client.interrupt).start()
    with pytest.raises(ApiError) as err:
        client.get_chats(inst)
    client.close()
    assert err.value.error_kind == "server_error"
    assert err.value.attempts == 1
    assert sim.request_count(inst.id_instance) == 1


def test_proxy_variables_are_honoured(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTP_PROXY`` from the environment is used (read once per API URL, at its first
    request): the API host here is a closed loopback port, reachable only through the
    proxy, which is the simulator itself (it serves the absolute-URI request line)."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", sim.url)
    monkeypatch.setenv("http_proxy", sim.url)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    inst = make_instance(sim, api_url=closed, max_attempts=1)
    client = GreenApiClient()
    try:
        before = sim.request_count()
        body = client.get_chats(inst).body
        assert decode_chats(body).received == len(sim.chats(inst.id_instance))
        again = client.get_chats(inst).body  # the second request: settings kept
        assert again == body
        assert sim.request_count() == before + 2
    finally:
        client.close()
    # without the variable, the same URL is refused: the proxy made the difference
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name)
    client = GreenApiClient()
    try:
        with pytest.raises(ApiError) as err:
            client.get_chats(inst)
        assert err.value.error_kind == "connection"
    finally:
        client.close()


def test_the_body_watchdog_cuts_only_reads_still_running(
    sim: Simulator, fast_client: GreenApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests whose deadlines pass after they finished are never cut (a cut would hit
    a pooled connection, maybe serving another request by then)."""
    import etl.transport

    cuts: list[object] = []
    real_cut = etl.transport._cut
    monkeypatch.setattr(etl.transport, "_cut", lambda r: (cuts.append(r), real_cut(r)))
    inst = make_instance(sim)
    for _ in range(20):
        fast_client.get_chats(inst, budget_seconds=0.3)
    time.sleep(0.5)  # every deadline has passed
    assert cuts == []
    # while a read still running at its deadline is cut
    with drip_server(b"[" + b" " * 28 + b"]", every=0.2) as url:
        slow = make_instance(sim, api_url=url, timeout_seconds=1.0)
        with pytest.raises(ApiError):
            fast_client.get_chats(slow, budget_seconds=0.5)
    assert len(cuts) == 1

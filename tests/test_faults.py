"""Every HTTP outcome Green-API can produce, over real HTTP, through ``Syncer.sync`` and a
running ``Daemon``, on SQLite and PostgreSQL.

For each fault: the right ``status``/``error_kind``/``http_status``/``attempts`` land in
``sync_runs``; every stored chat, history row, event and state row is exactly as it was
before (the fetch failed, so nothing may change); the requests the simulator received are
exactly the attempts recorded (retry traffic is bounded by ``max_attempts``); and the next
healthy tick applies the simulator's current list. The daemon test runs all of them at once
for several intervals and checks the daemon, its jobs and a healthy neighbour keep going.

Already proven elsewhere and not repeated here: the client's classification of every status
and body (tests/test_client.py), the canary token on every error path (tests/test_canary.py),
growing intervals for broken instances (tests/test_backoff.py).

``check_runs_consistent`` and ``db_state`` are shared by the other reliability suites
(test_outages, test_kills, test_properties).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, create_engine

from etl.client import GreenApiClient
from etl.scheduler import Daemon
from etl.simulator import ChangeRates, Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import check_history_invariants, rows, scalar

# -- shared checks -----------------------------------------------------------------------

_STATE_TABLES = {
    "chats": "SELECT * FROM chats WHERE instance_id = :i ORDER BY chat_id",
    "history": "SELECT * FROM chat_ephemeral_history WHERE instance_id = :i ORDER BY id",
    "events": "SELECT * FROM chat_events WHERE instance_id = :i ORDER BY id",
    "state": "SELECT pending_removal_digest, pending_removal_streak FROM instance_sync_state "
    "WHERE instance_id = :i",
}


def db_state(engine: Engine, instance_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a tick may write for one instance, except its ``sync_runs`` rows."""
    return {
        name: [tuple(r) for r in rows(engine, sql, i=instance_id)]
        for name, sql in _STATE_TABLES.items()
    }


def check_runs_consistent(engine: Engine) -> None:
    """No ``sync_runs`` row without its data and no data without its run.

    Each applied run opened exactly ``chats_inserted + ephemeral_changes`` history rows and
    wrote one ``created`` event per inserted chat, one ``removed`` per removed chat and one
    ``ephemeral_changed`` per change; failed and anomaly runs wrote none; every history row
    and event points at a run of its own instance; the per-run counts are not negative and
    add up (``inserted + updated + rejected <= received``).
    """
    runs = {r.id: r for r in rows(engine, "SELECT * FROM sync_runs")}
    opened = Counter(
        (r.sync_run_id, r.instance_id)
        for r in rows(engine, "SELECT sync_run_id, instance_id FROM chat_ephemeral_history")
    )
    events = Counter(
        (r.sync_run_id, r.instance_id, r.event_type)
        for r in rows(engine, "SELECT sync_run_id, instance_id, event_type FROM chat_events")
    )
    for run_id, iid in opened:
        assert run_id in runs, f"history rows of run {run_id} without the run"
        assert runs[run_id].instance_id == iid, f"history of run {run_id} in another instance"
    for run_id, iid, _kind in events:
        assert run_id in runs, f"events of run {run_id} without the run"
        assert runs[run_id].instance_id == iid, f"events of run {run_id} in another instance"
    for run in runs.values():
        counts = (
            run.chats_received,
            run.chats_inserted,
            run.chats_updated,
            run.chats_removed,
            run.chats_rejected,
            run.ephemeral_changes,
            run.attempts,
        )
        assert min(counts) >= 0, run
        assert run.finished_at is not None and run.finished_at >= run.started_at, run
        key = (run.id, run.instance_id)
        if run.status != "ok":
            assert opened[key] == 0, f"{run.status} run {run.id} opened history rows"
            assert not any(k[:2] == key for k in events), f"{run.status} run {run.id} has events"
            assert run.error_kind, run
            continue
        assert run.error_kind is None, run
        assert run.chats_inserted + run.chats_updated + run.chats_rejected <= run.chats_received
        assert opened[key] == run.chats_inserted + run.ephemeral_changes, run
        assert events[(*key, "created")] == run.chats_inserted, run
        assert events[(*key, "removed")] == run.chats_removed, run
        assert events[(*key, "ephemeral_changed")] == run.ephemeral_changes, run


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the fault matrix ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    fault: Fault | None
    kind: str
    http: int | None
    attempts: int
    requests: int | None = None  # what the simulator receives (default: attempts)
    status: str = "failed"
    overrides: dict[str, Any] = field(default_factory=dict)
    error_has: tuple[str, ...] = ()
    min_seconds: float = 0.0


def _400(text: str) -> Fault:
    return Fault(status=400, body=text.encode())


CLOSED = "closed-port"  # replaced by a port nothing listens on

CASES: dict[str, Case] = {
    # every 400 text of NOTES.md
    "400-starting": Case(_400("instance in starting process try later"), "starting", 400, 1),
    "400-not-authorized": Case(_400("instance account not authorized"), "not_authorized", 400, 1),
    # getStateInstance says "authorized" here: it was finishing a start (the other states:
    # tests/test_green_api.py)
    "400-starting-or-not-authorized": Case(
        _400("instance is starting or not authorized"), "starting", 400, 1
    ),
    "400-expired": Case(_400("Instance account is expired"), "expired", 400, 1),
    "400-deleted": Case(_400("Instance is deleted"), "expired", 400, 1),
    "400-bad-request-data": Case(_400("bad request data"), "bad_request", 400, 1),
    "400-validation-failed": Case(_400("Validation failed"), "bad_request", 400, 1),
    "401": Case(Fault(status=401), "unauthorized", 401, 1),
    "403": Case(Fault(status=403), "forbidden", 403, 1),
    "404": Case(Fault(status=404), "not_found", 404, 1),
    "429": Case(Fault(status=429), "rate_limited", 429, 4),
    "429-retry-after": Case(
        Fault(status=429, retry_after="1"),
        "rate_limited",
        429,
        2,
        overrides={"max_attempts": 2},
        min_seconds=1.0,  # the header was honoured
    ),
    "466": Case(
        Fault(status=466),
        "quota_exceeded",
        466,
        1,
        error_has=("used=100 total=100 status=QUOTE_EXCEEDED", "CORRESPONDENTS_QUOTE_EXCEEDED"),
    ),
    "499": Case(Fault(status=499), "server_error", 499, 4),
    "500": Case(Fault(status=500), "server_error", 500, 4),
    "502": Case(Fault(status=502), "server_error", 502, 4),
    "502-html-page": Case(Fault(status=502, mode="html"), "server_error", 502, 4),
    "503": Case(Fault(status=503), "server_error", 503, 4),
    "504": Case(Fault(status=504), "server_error", 504, 4),
    "slow-past-read-timeout": Case(
        Fault(delay=1.0), "timeout", None, 4, overrides={"timeout_seconds": 0.25}
    ),
    "connection-refused": Case(None, "connection", None, 4, requests=0),
    "reset-mid-body": Case(Fault(mode="reset"), "connection", None, 4),
    "truncated-json": Case(Fault(mode="truncate"), "bad_payload", 200, 1),
    "200-html-page": Case(Fault(mode="html"), "bad_payload", 200, 1),
    "200-json-object": Case(Fault(mode="object"), "bad_payload", 200, 1),
    "200-empty-list": Case(Fault(mode="empty"), "empty_response", 200, 1, status="anomaly"),
}


def _instance_for(sim: Simulator, iid: int, case: Case, port: int) -> Any:
    overrides = dict(case.overrides)
    if case.kind == "connection" and case.requests == 0:
        overrides["api_url"] = f"http://127.0.0.1:{port}"
    return make_instance(sim, iid, **overrides)


@pytest.mark.parametrize("name", list(CASES))
def test_fault_through_the_syncer(
    name: str, sim: Simulator, engine: Engine, fast_client: GreenApiClient
) -> None:
    case = CASES[name]
    iid = sim.instance_ids[0]
    healthy = make_instance(sim, iid)
    register_instances(engine, [healthy])
    syncer = Syncer(engine, fast_client)
    assert syncer.sync(healthy).status == "ok"
    sim.step(5)  # the list moved on: a failed tick must not apply any of it
    before = db_state(engine, iid)

    inst = _instance_for(sim, iid, case, closed_port())
    sim.reset_counts()
    sim.set_fault(iid, case.fault)
    t0 = time.monotonic()
    out = syncer.sync(inst)
    elapsed = time.monotonic() - t0
    sim.set_fault(iid, None)

    expected = (case.status, case.kind, case.http, case.attempts)
    assert (out.status, out.error_kind, out.http_status, out.attempts) == expected
    run = rows(engine, "SELECT * FROM sync_runs WHERE id = :r", r=out.sync_run_id)[0]
    assert (run.status, run.error_kind, run.http_status, run.attempts) == expected
    assert run.error and all(s in run.error for s in case.error_has), run.error
    if case.status == "failed":
        assert (run.chats_received, run.chats_inserted, run.chats_updated) == (0, 0, 0)
    assert sim.request_count(iid) == (case.attempts if case.requests is None else case.requests)
    assert elapsed >= case.min_seconds
    after = db_state(engine, iid)
    if case.status == "anomaly":  # the guard's streak bookkeeping may change, nothing else
        after["state"], before["state"] = [], []
    assert after == before, "a failed tick changed stored data"

    # the next healthy tick applies the simulator's current list
    again = syncer.sync(healthy)
    assert again.status == "ok", again
    stored = {
        r.chat_id
        for r in rows(
            engine, "SELECT chat_id FROM chats WHERE instance_id = :i AND removed_at IS NULL", i=iid
        )
    }
    assert stored == {c["id"] for c in sim.chats(iid)}
    check_history_invariants(engine)
    check_runs_consistent(engine)


def test_an_attempt_never_sent_is_not_counted(sim: Simulator, engine: Engine) -> None:
    """On an overloaded machine a retry wait can overshoot the fetch budget; the attempt
    that is then abandoned before sending anything is not an HTTP attempt. (Found by the
    soak: 42 of 14,863 recorded attempts had never reached the simulator.)"""
    iid = sim.instance_ids[0]
    inst = make_instance(sim, iid, interval_seconds=1)  # 0.8 s budget
    register_instances(engine, [inst])
    late = GreenApiClient(backoff_initial=0.01, backoff_max=0.02, sleep=lambda s: time.sleep(1.0))
    try:
        sim.set_fault(iid, Fault(status=503))
        out = Syncer(engine, late).sync(inst)
    finally:
        late.close()
    assert (out.status, out.error_kind) == ("failed", "timeout")
    assert "time budget exhausted" in (out.error or "")
    assert out.attempts == sim.request_count(iid) == 1


def test_mass_removal_is_confirmed_while_new_chats_keep_arriving(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient
) -> None:
    """Most chats were deleted at once (a real clean-up), and new chats keep arriving: the
    removal must eventually be applied, and the new chats with it."""
    iid = sim.instance_ids[0]
    inst = make_instance(sim, iid, mass_removal_confirmations=3)
    register_instances(engine, [inst])
    syncer = Syncer(engine, fast_client)
    kept = [{"id": f"7900000000{i}@c.us", "name": f"c{i}"} for i in range(4)]
    gone = [{"id": f"7911111111{i}@c.us", "name": f"g{i}"} for i in range(6)]
    sim.set_chats(iid, kept + gone)
    assert syncer.sync(inst).status == "ok"
    statuses = []
    for tick in range(8):
        new = [{"id": f"7922222222{i}@c.us", "name": f"n{i}"} for i in range(tick + 1)]
        sim.set_chats(iid, new + kept)  # 6 of 10 gone; one more new chat each tick
        statuses.append(syncer.sync(inst).status)
    assert "ok" in statuses, statuses
    present = rows(engine, "SELECT chat_id FROM chats WHERE removed_at IS NULL")
    assert len(present) == 4 + 8


# -- 100,000 chats ---------------------------------------------------------------------------


HUGE = 100_000

_HUGE_FINGERPRINT = {
    "chats": "SELECT COUNT(*), MAX(updated_at), COUNT(removed_at) FROM chats "
    "WHERE instance_id = :i",
    "history": "SELECT COUNT(*), MAX(id), COUNT(valid_to) FROM chat_ephemeral_history "
    "WHERE instance_id = :i",
    "events": "SELECT COUNT(*), MAX(id) FROM chat_events WHERE instance_id = :i",
    # no chat with two open rows or none (check_history_invariants, in SQL for 100k rows)
    "open": "SELECT COUNT(*) FROM chats c WHERE instance_id = :i AND 1 <> (SELECT COUNT(*) "
    "FROM chat_ephemeral_history h WHERE h.instance_id = c.instance_id "
    "AND h.chat_id = c.chat_id AND h.valid_to IS NULL)",
}


def _huge_fingerprint(engine: Engine, iid: int) -> dict[str, tuple[Any, ...]]:
    return {k: tuple(rows(engine, sql, i=iid)[0]) for k, sql in _HUGE_FINGERPRINT.items()}


@pytest.mark.slow
def test_100k_chats_stored_fully_then_an_identical_tick_writes_nothing(
    engine: Engine, fast_client: GreenApiClient
) -> None:
    with Simulator(instances=1, chats=5, seed=5) as sim:
        iid = sim.instance_ids[0]
        inst = make_instance(sim, iid, timeout_seconds=60.0)
        register_instances(engine, [inst])
        sim.set_fault(iid, Fault(mode="huge", times=2))  # the same 100,000 chats twice
        syncer = Syncer(engine, fast_client)
        first = syncer.sync(inst)
        assert (first.status, first.chats_received, first.chats_inserted) == ("ok", HUGE, HUGE)
        assert (first.chats_rejected, first.ephemeral_changes, first.attempts) == (0, 0, 1)
        served = orjson.loads(sim._huge_body(iid, HUGE))
        stored = {r.chat_id for r in rows(engine, "SELECT chat_id FROM chats")}
        assert stored == {c["id"] for c in served}
        before = _huge_fingerprint(engine, iid)
        assert before["chats"][0] == HUGE and before["chats"][2] == 0
        assert before["history"][0] == HUGE and before["history"][2] == 0
        assert before["events"][0] == HUGE and before["open"] == (0,)
        # the same list again, in this process (cached fingerprints) and in a fresh one
        for again in (syncer, Syncer(engine, fast_client)):
            if again is not syncer:
                sim.set_fault(iid, Fault(mode="huge", times=1))
            second = again.sync(inst)
            assert (second.status, second.chats_received) == ("ok", HUGE)
            counts = (
                second.chats_inserted,
                second.chats_updated,
                second.chats_removed,
                second.ephemeral_changes,
            )
            assert counts == (0, 0, 0, 0)
            assert _huge_fingerprint(engine, iid) == before, "an identical tick wrote rows"
        assert sim.request_count(iid) == 3
        assert scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'") == 3


# -- the daemon across every fault at once ---------------------------------------------------


@pytest.fixture
def fleet_sim() -> Iterator[Simulator]:
    """One simulated instance per fault, plus a healthy one; lists change every tick."""
    rates = ChangeRates(new=0.1, rename=0.1, archive=0.05, ephemeral=0.2, removal=0.02)
    with Simulator(instances=len(CASES) + 1, chats=20, seed=19, rates=rates) as s:
        yield s


def test_daemon_keeps_running_across_every_fault(
    fleet_sim: Simulator, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="etl")
    sim = fleet_sim
    port = closed_port()
    *faulty_ids, healthy_id = sim.instance_ids
    # 1 s interval: each fetch gets a 0.8 s budget, so slow answers time out sooner and a
    # Retry-After beyond the budget ends the tick (see test_client)
    by_id = {iid: (name, CASES[name]) for iid, name in zip(faulty_ids, CASES, strict=True)}
    fleet = [make_instance(sim, healthy_id, interval_seconds=1)]
    for iid, (_name, case) in by_id.items():
        overrides = {**case.overrides, "interval_seconds": 1, "timeout_seconds": 0.3}
        overrides.pop("max_attempts", None)
        if case.requests == 0:
            overrides["api_url"] = f"http://127.0.0.1:{port}"
        fleet.append(make_instance(sim, iid, **overrides))
    register_instances(engine, fleet)
    client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
    syncer = Syncer(engine, client)
    for inst in fleet:  # stored data to protect
        assert Syncer(engine, client).sync(make_instance(sim, inst.id_instance)).status == "ok"
    sim.step(3)
    before = {iid: db_state(engine, iid) for iid in faulty_ids}
    runs_before = scalar(engine, "SELECT MAX(id) FROM sync_runs")
    sim.reset_counts()
    for iid, (_name, case) in by_id.items():
        sim.set_fault(iid, case.fault)

    # plain reads (the project's engine begins every SQLite transaction IMMEDIATE)
    reader = create_engine(engine.url.render_as_string(hide_password=False))

    def ticked() -> dict[int, int]:
        return dict(
            rows(
                reader,
                "SELECT instance_id, COUNT(*) FROM sync_runs WHERE id > :r GROUP BY instance_id",
                r=runs_before,
            )
        )

    daemon = Daemon(syncer=syncer, instances=fleet, max_workers=8)
    started = time.monotonic()
    daemon.start()
    try:
        # 4.5 s at least, and until the healthy instance has synced 3 times and every
        # faulty one once: on a loaded machine that takes longer (ticks run late or are
        # skipped), which is its speed; the deadline only stops a hang
        deadline = started + 30
        scheduled = False  # on PostgreSQL the jobs come with the leases, a heartbeat in
        while True:
            time.sleep(0.25)
            assert daemon.scheduler.running
            jobs = len([j for j in daemon.scheduler.get_jobs() if j.id.startswith("sync-")])
            scheduled = scheduled or jobs == len(fleet)
            assert jobs == len(fleet) or not scheduled  # a fault never costs a job
            sim.step()  # the healthy instance's list keeps changing
            n = ticked()
            done = n.get(healthy_id, 0) >= 3 and all(n.get(iid, 0) >= 1 for iid in faulty_ids)
            if (done and time.monotonic() >= started + 4.5) or time.monotonic() > deadline:
                break
    finally:
        stopped = daemon.stop()  # before the faults go: a retry must not see a healthy answer
        for iid in faulty_ids:
            sim.set_fault(iid, None)
        client.close()
        reader.dispose()
    elapsed = time.monotonic() - started
    assert stopped is True

    runs = rows(
        engine,
        "SELECT instance_id, status, error_kind, http_status, attempts FROM sync_runs "
        "WHERE id > :r ORDER BY id",
        r=runs_before,
    )
    by_instance: dict[int, list[Any]] = {}
    for r in runs:
        by_instance.setdefault(r.instance_id, []).append(r)
    healthy_runs = by_instance.get(healthy_id, [])
    assert len(healthy_runs) >= 3 and all(r.status == "ok" for r in healthy_runs), healthy_runs
    assert all(r.chats_inserted + r.chats_updated > 0 for r in _runs_full(engine, healthy_id)[1:])
    problems = []
    for iid, (name, case) in by_id.items():
        got = by_instance.get(iid, [])
        sent = sim.request_count(iid)
        # at least one; at most one per 1 s interval (a tick that fails is not repeated)
        if not 1 <= len(got) <= elapsed + 1:
            problems.append(f"{name}: {len(got)} ticks in {elapsed:.1f} s at a 1 s interval")
        for r in got:
            if (r.status, r.error_kind, r.http_status) != (case.status, case.kind, case.http):
                problems.append(f"{name}: recorded {tuple(r)}")
            if not 1 <= r.attempts <= 4:
                problems.append(f"{name}: {r.attempts} attempts")
        expected_sent = 0 if case.requests == 0 else sum(r.attempts for r in got)
        if sent != expected_sent:
            problems.append(f"{name}: simulator saw {sent} requests, runs record {expected_sent}")
        after = db_state(engine, iid)
        if case.status == "anomaly":
            after["state"], before[iid]["state"] = [], []
        if after != before[iid]:
            problems.append(f"{name}: stored data changed")
    assert not problems, "\n".join(problems)
    # one log line per failed tick, and no tick crashed
    failed_lines = [r for r in caplog.records if "sync failed kind=" in r.getMessage()]
    assert len(failed_lines) == sum(1 for r in runs if r.status == "failed")
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    check_history_invariants(engine)
    check_runs_consistent(engine)


def _runs_full(engine: Engine, iid: int) -> list[Any]:
    return rows(engine, "SELECT * FROM sync_runs WHERE instance_id = :i ORDER BY id", i=iid)

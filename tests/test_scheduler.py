"""The scheduler: staggered starts, real runs against the simulator, one sync per instance at
a time, and signal handling of ``python -m etl run`` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, cast

import pytest
from apscheduler.schedulers.base import STATE_STOPPED
from pydantic import SecretStr
from sqlalchemy import Engine, Table, create_engine, select, text

from etl.client import GreenApiClient
from etl.config import Instance
from etl.db import downgrade, make_engine, upgrade
from etl.leases import Beat, Held, LeaseManager
from etl.models import SyncRun
from etl.scheduler import Daemon, stagger_offsets
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances, utcnow
from tests.conftest import make_instance, pg_only
from tests.factories import check_history_invariants, rows, scalar


def _inst(id_instance: int, interval: int, *, enabled: bool = True) -> Instance:
    return Instance(
        id_instance=id_instance,
        label=f"i{id_instance}",
        api_url="http://127.0.0.1:9",
        token=SecretStr("t" * 50),
        count=None,
        enabled=enabled,
        interval_seconds=interval,
        timeout_seconds=1.0,
        connect_timeout_seconds=1.0,
        max_attempts=1,
        mass_removal_threshold=0.5,
        mass_removal_confirmations=3,
    )


def _runs(engine: Engine, instance_id: int) -> list[Any]:
    """The instance's sync_runs rows, oldest first, with typed (aware) timestamps."""
    t = cast(Table, SyncRun.__table__)
    query = select(t.c.status, t.c.error_kind, t.c.started_at, t.c.finished_at)
    query = query.where(t.c.instance_id == instance_id).order_by(t.c.started_at)
    with engine.connect() as conn:
        return list(conn.execute(query))


def _assert_no_overlap(runs: list[Any]) -> None:
    for prev, nxt in zip(runs, runs[1:], strict=False):
        assert prev.finished_at <= nxt.started_at, f"two syncs at once: {prev} / {nxt}"


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond``; ``timeout`` only stops a hang (a loaded machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- stagger -------------------------------------------------------------------------------


def test_stagger_offsets_spread_first_runs_evenly_per_interval() -> None:
    fleet = [_inst(i, 60) for i in range(1, 5)] + [_inst(i, 10) for i in range(11, 13)]
    fleet.append(_inst(21, 7))
    offsets = stagger_offsets(fleet)
    assert set(offsets) == {i.id_instance for i in fleet}
    assert [offsets[i] for i in range(1, 5)] == [0.0, 15.0, 30.0, 45.0]
    assert [offsets[11], offsets[12]] == [0.0, 5.0]
    assert offsets[21] == 0.0
    for interval in (60, 10, 7):
        group = sorted(offsets[i.id_instance] for i in fleet if i.interval_seconds == interval)
        assert all(0 <= o < interval for o in group)
        gaps = [b - a for a, b in zip(group, [*group[1:], group[0] + interval], strict=True)]
        assert gaps == pytest.approx([interval / len(group)] * len(group)), group
    assert stagger_offsets([]) == {}


def test_daemon_schedules_staggered_first_runs(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'unused.db'}")
    client = GreenApiClient()
    fleet = [_inst(i, 30) for i in (1, 2, 3)] + [_inst(4, 30, enabled=False)]
    daemon = Daemon(syncer=Syncer(engine, client), instances=fleet, max_workers=2)
    now = utcnow() + timedelta(hours=1)  # nothing fires during the test
    daemon.start(now=now)
    try:
        jobs = {j.id: j for j in daemon.scheduler.get_jobs() if j.id.startswith("sync-")}
        assert set(jobs) == {"sync-1", "sync-2", "sync-3"}  # disabled instances get no job
        firsts = sorted((jobs[f"sync-{i}"].next_run_time - now).total_seconds() for i in (1, 2, 3))
        assert firsts == pytest.approx([0.2, 10.2, 20.2], abs=1e-3)
        assert all(job.max_instances == 1 and job.coalesce for job in jobs.values())
    finally:
        assert daemon.stop()
        client.close()
        engine.dispose()


# -- the daemon in-process against the simulator --------------------------------------------


@pytest.fixture
def interval_1s(sim: Simulator, engine: Engine) -> list[Instance]:
    fleet = [make_instance(sim, iid, interval_seconds=1) for iid in sim.instance_ids]
    register_instances(engine, fleet)
    return fleet


def test_daemon_syncs_each_instance_every_interval(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient, interval_1s: list[Instance]
) -> None:
    daemon = Daemon(syncer=Syncer(engine, fast_client), instances=interval_1s, max_workers=4)
    # plain reads (the project's engine begins every SQLite transaction IMMEDIATE)
    reader = create_engine(engine.url.render_as_string(hide_password=False))
    t0 = time.monotonic()
    daemon.start()
    try:
        # three syncs each: how long that takes is the machine's speed (about 3 intervals
        # when idle); that there is never more than one per interval is the property
        _wait_for(
            lambda: all(len(_runs(reader, i.id_instance)) >= 3 for i in interval_1s),
            30,
            "three syncs of every instance",
        )
    finally:
        reader.dispose()
        assert daemon.stop()
    elapsed = time.monotonic() - t0
    total = 0
    for inst in interval_1s:
        runs = _runs(engine, inst.id_instance)
        # first runs at 0.2 s + 0/3, 1/3, 2/3 of the interval, then at most one a second
        n = len(runs)
        assert 3 <= n <= elapsed + 1, f"{inst.id_instance}: {n} syncs in {elapsed:.1f} s"
        assert all(r.status == "ok" for r in runs)
        assert sim.request_count(inst.id_instance) == len(runs)
        _assert_no_overlap(runs)
        total += len(runs)
    assert daemon.ticks == total
    check_history_invariants(engine)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the database plays no part
def test_slow_api_keeps_requests_bounded(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient, interval_1s: list[Instance]
) -> None:
    for inst in interval_1s:
        sim.set_fault(inst.id_instance, Fault(delay=3.0))  # longer than the interval
    daemon = Daemon(syncer=Syncer(engine, fast_client), instances=interval_1s, max_workers=8)
    assert daemon.run_for(3.5) is True
    for inst in interval_1s:
        n = sim.request_count(inst.id_instance)
        assert 2 <= n <= 4, f"{inst.id_instance}: {n} requests in 3.5 s at 1 s interval"
        runs = _runs(engine, inst.id_instance)
        assert len(runs) == n
        assert {(r.status, r.error_kind) for r in runs} == {("failed", "timeout")}
        _assert_no_overlap(runs)
        # each sync ended at its 0.8 s budget, none waited for its 3 s answer: nor did the
        # shutdown, which waits for the running syncs (timing the stop itself would measure
        # the machine: it is that budget plus however slow the machine is)
        longest = max((r.finished_at - r.started_at).total_seconds() for r in runs)
        assert longest < 3.0, f"{inst.id_instance}: a sync lasted {longest:.1f} s"


class CountingLeases(LeaseManager):
    """A real lease manager that also notes when each replica heartbeat ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beats: list[float] = []

    def beat(self) -> Beat:
        done = super().beat()
        self.beats.append(time.time())  # the clock of sync_runs' timestamps
        return done


@pg_only  # replicas coordinate on PostgreSQL only
def test_replica_heartbeat_keeps_time_while_every_sync_worker_is_busy(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient, interval_1s: list[Instance]
) -> None:
    """A backlog of syncs (one worker, three instances whose API answers only after the
    fetch budget) does not delay the heartbeat: it has a thread of its own. In the sync
    pool it waited behind the syncs, and other replicas would count this one dead."""
    for inst in interval_1s:
        sim.set_fault(inst.id_instance, Fault(delay=3.0))
    leases = CountingLeases(engine, interval_1s, heartbeat_seconds=0.25)
    daemon = Daemon(
        syncer=Syncer(engine, fast_client), instances=interval_1s, max_workers=1, leases=leases
    )
    assert daemon.run_for(3.0) is True
    beats = leases.beats[1:]  # the first is the one start() runs itself
    # heartbeats while a sync was running, i.e. while the only sync worker was busy: in the
    # sync pool there are none (each would wait for the sync), with a thread of its own
    # there are several per sync. Counting beats in a window or timing their gaps would
    # measure the machine; this is load-proof (load makes the syncs longer, not shorter)
    syncs = [
        (r.started_at.timestamp(), r.finished_at.timestamp())
        for i in interval_1s
        for r in _runs(engine, i.id_instance)
    ]
    during = [b for b in beats if any(start < b < end for start, end in syncs)]
    assert len(during) >= 2, (beats, syncs)
    # and the syncs were indeed queued up behind one another the whole time
    assert sum(sim.request_count(i.id_instance) for i in interval_1s) <= 5
    assert scalar(engine, "SELECT COUNT(*) FROM replicas") == 0  # released at shutdown


class DbWriteLock:
    """Blocks every sync's write transaction (from another connection) until released."""

    def __init__(self, engine: Engine) -> None:
        self.conn = engine.connect()
        if engine.dialect.name == "postgresql":
            # the sync's first statement (after its advisory lock) reads chats
            self.conn.exec_driver_sql("LOCK TABLE chats IN ACCESS EXCLUSIVE MODE")
        else:
            self.conn.begin()  # BEGIN IMMEDIATE (see etl.db): holds the SQLite write lock
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.conn.rollback()
            self.conn.close()


def _stop_while(daemon: Daemon, change: Callable[[], None]) -> None:
    """Stop ``daemon`` while a running job (in the heartbeat's executor, like the
    heartbeat) calls ``change`` once the shutdown has begun; assert that both finish."""
    running = threading.Event()
    changed = threading.Event()

    def change_it() -> None:
        change()
        changed.set()

    def heartbeat() -> None:
        running.set()
        _wait_for(lambda: daemon.scheduler.state == STATE_STOPPED, 10, "the shutdown")
        # on a thread of its own, which this job waits for only so long: were the change
        # to hang, the shutdown (and so the test process) would hang with it
        helper = threading.Thread(target=change_it, daemon=True)
        helper.start()
        helper.join(8.0)

    # an interval job, like the heartbeat (the scheduler removes a one-off job once run)
    daemon.scheduler.add_job(
        heartbeat, "interval", hours=1, next_run_time=utcnow(), executor="replica"
    )
    assert running.wait(10)
    assert daemon.stop() is True
    assert changed.is_set()


@pytest.mark.parametrize("change", ["schedule", "unschedule"])
def test_stop_finishes_while_a_running_job_changes_the_schedule(
    sim: Simulator,
    engine: Engine,
    fast_client: GreenApiClient,
    interval_1s: list[Instance],
    change: str,
) -> None:
    """APScheduler's shutdown holds its job-store lock while it waits for the running jobs.
    A heartbeat that scheduled the instances it had just claimed, or dropped ones it lost,
    at that moment waited for the lock, and the shutdown for the heartbeat: the daemon
    exited 1 after ``shutdown_timeout`` with its leases held (CI: test_outages' two
    daemons, the second stopped just as it claimed the first's instances)."""
    daemon = Daemon(syncer=Syncer(engine, fast_client), instances=interval_1s, shutdown_timeout=5.0)
    daemon.start(now=utcnow() + timedelta(hours=1))  # no sync fires
    iid = interval_1s[0].id_instance
    if change == "schedule":
        _stop_while(daemon, lambda: daemon._schedule([Held(iid, 0, None)], utcnow(), spread=None))
    else:
        _stop_while(daemon, lambda: daemon._unschedule([iid]))


@pg_only  # replicas coordinate on PostgreSQL only
def test_stop_finishes_while_a_heartbeat_looks_for_instances_to_hand_back(
    sim: Simulator, engine: Engine, fast_client: GreenApiClient, interval_1s: list[Instance]
) -> None:
    """The same for a heartbeat choosing what to hand back (it reads the jobs)."""
    daemon = Daemon(syncer=Syncer(engine, fast_client), instances=interval_1s, shutdown_timeout=5.0)
    daemon.start(now=utcnow() + timedelta(hours=1))  # no sync fires
    daemon._heartbeat()  # the second beat claims them all (alone)
    assert daemon.leases.owned == {i.id_instance for i in interval_1s}
    _stop_while(daemon, lambda: daemon._hand_back(1))


def test_never_two_syncs_of_one_instance_at_once(
    sim: Simulator,
    engine: Engine,
    fast_client: GreenApiClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING")
    inst = make_instance(sim, interval_seconds=1)
    register_instances(engine, [inst])
    daemon = Daemon(syncer=Syncer(engine, fast_client), instances=[inst], max_workers=4)
    daemon.start()  # the first sync fires 0.2 s later
    lock = DbWriteLock(engine)
    iid = inst.id_instance
    # plain reads (the project's engine begins every SQLite transaction IMMEDIATE: blocked)
    reader = create_engine(engine.url.render_as_string(hide_password=False))
    try:
        # a sync that fetched and has no row is stuck on the lock: the first one, or (if
        # that one was written before the lock, on a loaded machine) the next
        _wait_for(lambda: sim.request_count(iid) > len(_runs(reader, iid)), 10, "a sync stuck")
        before = sim.request_count(iid)
        time.sleep(2.7)  # it is now stuck on the database for more than 2 intervals
        during = sim.request_count(iid) - before
        lock.release()
        time.sleep(0.9)
    finally:
        lock.release()
        reader.dispose()
        assert daemon.stop()
    assert during == 0, f"{during} syncs started while one was stuck"
    runs = _runs(engine, inst.id_instance)
    assert 1 <= len(runs) <= 3
    assert sim.request_count(inst.id_instance) == len(runs)
    assert all(r.status == "ok" for r in runs)
    assert max((r.finished_at - r.started_at).total_seconds() for r in runs) > 2.0
    _assert_no_overlap(runs)
    messages = [r.getMessage() for r in caplog.records]
    # the scheduler itself refused the overlapping runs (max_instances=1); the Syncer's own
    # guard against a concurrent sync never had to step in
    assert any("maximum number of running instances reached" in m for m in messages)
    assert not any("previous sync still running" in m for m in messages)


# -- python -m etl run, signals --------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ETL_DATABASE_URL", "ETL_CONFIG")}
    env.update(extra)
    return env


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """The database at ``db_url``, migrated (what ``etl run`` in the subprocess uses)."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def one_sim() -> Iterator[Simulator]:
    with Simulator(instances=1, chats=20, seed=3, tick_seconds=None) as s:
        yield s


def _config(tmp_path: Path, sim: Simulator) -> Path:
    text = sim.config_toml(interval_seconds=60)
    text = text.replace("[defaults]\n", "[defaults]\ntimeout_seconds = 10\n", 1)
    path = tmp_path / "etl.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def _due_now(engine: Engine, iid: int) -> None:
    """Make the instance due at once: a daemon starts an instance's ticks when its state
    row says the next one is due (one interval after the sync just made)."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE instance_sync_state SET next_due_at = NULL WHERE instance_id = :i"),
            {"i": iid},
        )


class Daemonproc:
    """``python -m etl run`` in the background, stderr to a file."""

    def __init__(self, tmp_path: Path, config: Path, db_url: str) -> None:
        self.stderr_path = tmp_path / "run.stderr"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", "--config", str(config)],
            cwd=tmp_path,
            env=_env(ETL_DATABASE_URL=db_url),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"etl run exited ({self.proc.returncode}) before {what}: {self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}: {self.stderr}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def daemon_proc(tmp_path: Path) -> Iterator[Callable[[Path, str], Daemonproc]]:
    started: list[Daemonproc] = []

    def start(config: Path, db_url: str) -> Daemonproc:
        started.append(Daemonproc(tmp_path, config, db_url))
        return started[-1]

    yield start
    for d in started:
        d.close()


def test_sigterm_lets_the_running_sync_finish(
    tmp_path: Path,
    db_url: str,
    db_engine: Engine,
    one_sim: Simulator,
    daemon_proc: Callable[[Path, str], Daemonproc],
) -> None:
    iid = one_sim.instance_ids[0]
    one_sim.set_fault(iid, Fault(delay=2.0))
    d = daemon_proc(_config(tmp_path, one_sim), db_url)
    d.wait_until("the first request", lambda: one_sim.request_count(iid) >= 1)
    signalled_at = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(timeout=10)
    assert rc == 0, d.stderr
    # the signal came before the 2 s answer (the simulator notes the time it answered),
    # and the sync that got it is recorded below: the exit waited for it. An order of
    # events, not a duration, which a loaded machine would stretch or shrink
    assert [r.at > signalled_at for r in one_sim.requests] == [True], "signalled too late"
    assert "finishing running syncs" in d.stderr
    assert "Traceback" not in d.stderr
    runs = rows(
        db_engine, "SELECT status, chats_received FROM sync_runs WHERE instance_id = :i", i=iid
    )
    assert [(r.status, r.chats_received) for r in runs] == [("ok", 20)]
    assert scalar(db_engine, "SELECT COUNT(*) FROM chats WHERE instance_id = :i", i=iid) == 20
    assert one_sim.request_count(iid) == 1
    check_history_invariants(db_engine)


@pytest.mark.parametrize(
    "db_url,second",
    [
        ("sqlite", signal.SIGTERM),
        pytest.param("postgres", signal.SIGINT, marks=pytest.mark.postgres),
    ],
    ids=["sqlite-TERM", "postgres-INT"],
    indirect=["db_url"],
)
def test_second_signal_exits_at_once(
    tmp_path: Path,
    db_url: str,
    db_engine: Engine,
    one_sim: Simulator,
    fast_client: GreenApiClient,
    daemon_proc: Callable[[Path, str], Daemonproc],
    second: signal.Signals,
) -> None:
    iid = one_sim.instance_ids[0]
    inst = make_instance(one_sim, iid)
    register_instances(db_engine, [inst])
    assert Syncer(db_engine, fast_client).sync(inst).status == "ok"  # some data to protect
    _due_now(db_engine, iid)
    one_sim.step(5)
    one_sim.set_fault(iid, Fault(delay=8.0))
    d = daemon_proc(_config(tmp_path, one_sim), db_url)
    d.wait_until("the request", lambda: one_sim.request_count(iid) >= 2)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_until("the first signal is handled", lambda: "send again to exit now" in d.stderr)
    d.proc.send_signal(second)
    rc = d.proc.wait(timeout=5)
    assert rc != 0
    assert rc == 130, d.stderr
    # gone before the 8 s answer was sent (the simulator notes each answer when sent; only
    # the first sync's is there), not after it nor after the 30 s shutdown timeout
    assert len(one_sim.requests) == 1, "the daemon waited for the running sync"
    assert "second signal" in d.stderr
    assert scalar(db_engine, "SELECT COUNT(*) FROM sync_runs WHERE instance_id = :i", i=iid) == 1
    check_history_invariants(db_engine)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_shutdown_timeout_bounds_the_wait(
    tmp_path: Path,
    db_url: str,
    db_engine: Engine,
    one_sim: Simulator,
    daemon_proc: Callable[[Path, str], Daemonproc],
) -> None:
    iid = one_sim.instance_ids[0]
    one_sim.set_fault(iid, Fault(delay=8.0))
    config = _config(tmp_path, one_sim)
    text = config.read_text(encoding="utf-8")
    config.write_text("[scheduler]\nshutdown_timeout_seconds = 1\n\n" + text, encoding="utf-8")
    d = daemon_proc(config, db_url)
    d.wait_until("the request", lambda: one_sim.request_count(iid) >= 1)
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(timeout=10)
    # gone before the 8 s answer was sent (the simulator notes each answer when sent):
    # the wait ended at the 1 s shutdown timeout, not with the sync
    assert one_sim.requests == [], "waited for the sync beyond shutdown_timeout_seconds"
    assert rc == 1, d.stderr
    assert "did not finish within 1s" in d.stderr
    assert scalar(db_engine, "SELECT COUNT(*) FROM sync_runs") == 0
    check_history_invariants(db_engine)


@pytest.mark.postgres  # SQLite: see test_cli.py::test_refuses_before_db_upgrade
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_run_refuses_a_database_not_at_head(
    tmp_path: Path, db_url: str, one_sim: Simulator
) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        downgrade(engine, "base")
    finally:
        engine.dispose()
    proc = subprocess.run(
        [sys.executable, "-m", "etl", "run", "--config", str(_config(tmp_path, one_sim))],
        cwd=tmp_path,
        env=_env(ETL_DATABASE_URL=db_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr
    assert "run `etl db upgrade`" in proc.stderr
    assert one_sim.request_count() == 0

"""The database goes away while the daemon runs, and two processes sync the same instances.

* PostgreSQL outage: the daemon (``python -m etl run``) talks to PostgreSQL through a TCP
  proxy on loopback that the test cuts (every connection closed, new ones refused) and
  restores. The shared server itself is never stopped.
* SQLite outage: another connection holds ``BEGIN EXCLUSIVE`` for a while.
* Two ``etl sync --once`` at the same moment on the same instance, and two daemons on the
  same instances, on both backends.

After each: no crash, a log line per failed tick, syncing resumes by itself at the next
tick or so (``resume_bound``), and no tick left partial rows (``check_history_invariants``,
``check_runs_consistent``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

import etl.db
import etl.sync.backlog
from etl.client import GreenApiClient
from etl.config import FileConfig
from etl.db import make_engine, upgrade
from etl.scheduler import Daemon
from etl.simulator import ChangeRates, Fault, Simulator
from etl.sync import Syncer, register_instances
from etl.sync.store.postgresql import instance_lock_key
from tests.conftest import make_instance
from tests.factories import check_history_invariants, rows, scalar
from tests.pgserver import PrivatePostgres, unavailable_reason
from tests.test_faults import check_runs_consistent

pytestmark = pytest.mark.slow

BUSY = ChangeRates(new=0.05, rename=0.05, archive=0.05, ephemeral=0.1, removal=0.03)

# -- helpers shared with test_kills ------------------------------------------------------------


def write_config(
    path: Path, sim: Simulator, *, interval: int = 1, defaults: str = "", workers: int = 4
) -> Path:
    """A config for ``sim`` (status endpoint off when this version has one)."""
    text_ = sim.config_toml(interval_seconds=interval)
    text_ = text_.replace("[defaults]\n", f"[defaults]\n{defaults}", 1)
    head = f"[scheduler]\nmax_workers = {workers}\nshutdown_timeout_seconds = 20\n\n"
    if "http" in FileConfig.model_fields:  # never fight over the default port
        head += "[http]\nenabled = false\n\n"
    path.write_text(head + text_, encoding="utf-8")
    path.chmod(0o600)
    return path


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}


class Proc:
    """``python -m etl ...`` in the background, stderr to a file."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "etl", *args],
            cwd=cwd,
            env=child_env(),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.alive(), f"exited ({self.proc.returncode}) before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text}"
            time.sleep(0.05)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+)\s+(\S+): (.*)$")


def log_lines(text_: str) -> list[tuple[float, str, str]]:
    """(unix time, level, message) of every formatted log line."""
    out = []
    for line in text_.splitlines():
        m = LOG_LINE.match(line)
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, m.group(2), m.group(4)))
    return out


def runs_of(engine: Engine, iid: int) -> list[Any]:
    return rows(
        engine,
        "SELECT id, status, error_kind, started_at, finished_at FROM sync_runs "
        "WHERE instance_id = :i ORDER BY started_at, id",
        i=iid,
    )


def resume_bound(interval: float) -> float:
    """Seconds after the database is back by which every instance has synced again. Its
    next tick is due within one interval; a loaded machine may start it late, or drop it
    as missed and run the one after, hence two intervals and a second. What the bound is
    for takes longer: a backoff after the four or more failed ticks of these outages (4
    intervals and up; ``database`` failures never back off, which test_backoff.py checks
    without a clock) or connections left dead in the pool (the connect and keepalive
    timeouts are 10 s and more)."""
    return 2 * interval + 1.0


def first_ok_after(engine: Engine, iids: list[int], since: float) -> dict[int, float]:
    """Seconds from ``since`` to each instance's first ``ok`` run started at or after it
    (instances without one yet are left out)."""
    out = {}
    for iid in iids:
        after = [
            as_unix(r.started_at)
            for r in runs_of(engine, iid)
            if r.status == "ok" and as_unix(r.started_at) >= since
        ]
        if after:
            out[iid] = min(after) - since
    return out


def assert_lost_ticks_recorded(engine: Engine, iid: int, down: float, up: float) -> None:
    """At least 3 ticks started while the database was away, all in ``sync_runs`` as
    ``failed``/``database`` (written once it was back)."""
    lost = [r for r in runs_of(engine, iid) if down + 0.5 <= as_unix(r.started_at) <= up - 0.5]
    assert len(lost) >= 3, (iid, lost)
    assert {(r.status, r.error_kind) for r in lost} == {("failed", "database")}, lost


def as_unix(value: Any) -> float:
    if isinstance(value, str):  # SQLite text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def final_pass_matches(engine: Engine, sim: Simulator) -> None:
    """One clean sync per instance of a frozen copy of its list; the table must equal it."""
    client = GreenApiClient()
    try:
        for iid in sim.instance_ids:
            frozen = sim.chats(iid)  # a ticking simulator moves on; serve this exact list
            inst = make_instance(sim, iid)  # 3 confirmations of a mass removal
            sim.set_fault(iid, Fault(body=orjson.dumps(frozen), times=3))
            syncer = Syncer(engine, client)
            out = syncer.sync(inst)
            # an instance left unsynced for long may have lost most of its chats: the
            # guard holds the same list back twice, then applies it
            for _ in range(2):
                if out.status == "ok":
                    break
                assert (out.status, out.error_kind) == ("anomaly", "mass_removal"), out
                out = syncer.sync(inst)
            assert out.status == "ok", out
            sim.set_fault(iid, None)
            stored = {
                r.chat_id: (r.name, r.archived, r.ephemeral_expiration)
                for r in rows(
                    engine,
                    "SELECT chat_id, name, archived, ephemeral_expiration FROM chats "
                    "WHERE instance_id = :i AND removed_at IS NULL",
                    i=iid,
                )
            }
            # an empty name keeps the stored one (no flickering renames): any name matches it
            served = {
                c["id"]: (
                    c["name"] or stored.get(c["id"], ("",))[0],
                    c["archive"],
                    c["ephemeralExpiration"],
                )
                for c in frozen
            }
            assert stored == served
    finally:
        client.close()


# -- a TCP proxy the test can cut -------------------------------------------------------------


class TcpProxy:
    """Loopback TCP proxy to ``target``. ``cut()`` closes every connection and refuses new
    ones (nothing listens on the port); ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self.accepted = 0

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # stalled: hold the bytes, keep the connection
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for s in (src, dst):
                if s in self._conns:
                    self._conns.discard(s)
                    s.close()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            listener.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                self.start()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stall(self) -> None:
        """The database stops answering; connections stay open (no FIN, no RST)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        self._flowing.set()
        self.cut()


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ok_runs(engine: Engine) -> int:
    return int(scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'"))


# -- PostgreSQL goes away ------------------------------------------------------------------------

INTERVAL = 1


@pytest.mark.postgres
def test_postgresql_outage_through_a_cut_proxy(pg_db: str, tmp_path: Path) -> None:
    direct = make_engine(pg_db)
    try:
        _pg_outage(pg_db, direct, tmp_path)
    finally:
        direct.dispose()


def _pg_outage(pg_db: str, direct: Engine, tmp_path: Path) -> None:
    url = make_url(pg_db)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    with Simulator(instances=3, chats=150, seed=21, rates=BUSY, tick_seconds=0.5) as sim:
        config = write_config(tmp_path / "etl.toml", sim, interval=INTERVAL)
        d = Proc(
            ["--config", str(config), "--database-url", via_proxy, "run"],
            tmp_path / "daemon.log",
            tmp_path,
        )
        try:
            d.wait_until("two ticks per instance", lambda: _ok_runs(direct) >= 6)
            # short blips at random points, to catch transactions in flight
            rnd = random.Random(7)
            for _ in range(4):
                time.sleep(rnd.uniform(0.3, 1.2))
                proxy.cut()
                time.sleep(rnd.uniform(0.1, 0.6))
                proxy.restore()
            time.sleep(1.5)
            # the long outage
            requests_before = sim.request_count()
            cut_at = time.time()
            proxy.cut()
            time.sleep(5.0)
            requests_during = sim.request_count() - requests_before
            assert d.alive(), d.text
            restored_at = time.time()
            proxy.restore()
            resumed: dict[int, float] = {}

            def all_resumed() -> bool:
                resumed.update(first_ok_after(direct, sim.instance_ids, restored_at))
                return len(resumed) == len(sim.instance_ids)

            d.wait_until("every instance synced again", all_resumed, timeout=15)
            time.sleep(1.0)
            assert d.alive(), d.text
            rc = d.terminate()
        finally:
            d.close()
            proxy.stop()
        log = d.text
        assert rc == 0, log
        assert "Traceback" not in log and "unexpected error" not in log, log
        # one line per instance per failed tick while the database was away
        lines = log_lines(log)
        for iid in sim.instance_ids:
            failed = [
                msg
                for when, level, msg in lines
                if cut_at <= when <= restored_at + 0.2
                and level in ("WARNING", "ERROR")
                and str(iid) in msg
                and ("could not renew the lease" in msg or "could not be recorded" in msg)
            ]
            assert len(failed) >= 3, f"{iid}: {len(failed)} failure lines in a 5 s outage\n{log}"
        # resumed at the next tick or so after the database's return
        assert max(resumed.values()) <= resume_bound(INTERVAL), resumed
        # the ticks lost to the outage are in sync_runs (written once it was over)
        for iid in sim.instance_ids:
            assert_lost_ticks_recorded(direct, iid, cut_at, restored_at)
        # a tick whose lease cannot be renewed does not call the API
        assert requests_during <= len(sim.instance_ids), requests_during
        # no run started during the long outage was recorded half-way
        check_history_invariants(direct)
        check_runs_consistent(direct)
        # and a final clean pass agrees with the simulator
        final_pass_matches(direct, sim)
    print(f"resumed after restore (s): {resumed}; proxy connections: {proxy.accepted}")


@pytest.mark.postgres
def test_postgresql_stall_then_resume(pg_db: str, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL stops answering for 4 s without closing anything (a stalled proxy or
    network): the syncs in flight wait, the ticks falling due meanwhile are skipped with a
    warning each, and everything resumes as soon as the bytes flow again."""
    caplog.set_level(logging.WARNING)
    url = make_url(pg_db)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    direct = make_engine(pg_db)
    with Simulator(instances=2, chats=60, seed=43, rates=BUSY) as sim:
        fleet = [make_instance(sim, iid, interval_seconds=1) for iid in sim.instance_ids]
        register_instances(direct, fleet)
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        daemon = Daemon(syncer=Syncer(engine, client), instances=fleet, max_workers=4)
        daemon.start()
        try:
            _wait_for(lambda: _ok_runs(direct) >= 4, 20, "two ticks per instance")
            sim.step()
            stalled_at = time.time()
            proxy.stall()
            time.sleep(4.0)
            resumed_at = time.time()
            proxy.resume()
            sim.step()
            _wait_for(
                lambda: all(
                    any(as_unix(r.started_at) > resumed_at for r in runs_of(direct, i.id_instance))
                    for i in fleet
                ),
                10,
                "fresh ticks after the stall",
            )
        finally:
            stopped = daemon.stop()
            client.close()
            proxy.stop()
            engine.dispose()
    assert stopped
    skipped = [
        r
        for r in caplog.records
        if stalled_at <= r.created <= resumed_at + 0.5
        and "maximum number of running instances reached" in r.getMessage()
    ]
    assert len(skipped) >= 2 * len(fleet), [r.getMessage() for r in caplog.records]
    failed = scalar(direct, "SELECT COUNT(*) FROM sync_runs WHERE status <> 'ok'")
    assert failed == 0
    check_history_invariants(direct)
    check_runs_consistent(direct)
    direct.dispose()


# -- SQLite locked by another connection ---------------------------------------------------------


@pytest.fixture
def sqlite_file(tmp_path: Path, sqlite_template: Path) -> Iterator[tuple[str, Path]]:
    import shutil

    path = tmp_path / "locked.db"
    shutil.copyfile(sqlite_template, path)
    yield f"sqlite:///{path}", path


def _hold_exclusive(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_sqlite_locked_with_a_short_busy_timeout(
    sqlite_file: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every tick while the file is locked fails after the busy timeout with one log line;
    the first tick after the lock is released syncs again."""
    monkeypatch.setattr(etl.db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    caplog.set_level(logging.INFO, logger="etl")
    db_url, path = sqlite_file
    engine = make_engine(db_url)
    with Simulator(instances=2, chats=60, seed=23, rates=BUSY) as sim:
        fleet = [make_instance(sim, iid, interval_seconds=1) for iid in sim.instance_ids]
        register_instances(engine, fleet)
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        daemon = Daemon(syncer=Syncer(engine, client), instances=fleet, max_workers=4)
        daemon.start()
        try:
            _wait_for(lambda: _ok_runs(engine) >= 4, 15, "two ticks per instance")
            sim.step()
            locked_at = time.time()
            holder = _hold_exclusive(path)
            try:
                time.sleep(4.0)
                assert daemon.scheduler.running
            finally:
                released_at = time.time()
                holder.rollback()
                holder.close()
            sim.step()
            resumed: dict[int, float] = {}

            def all_resumed() -> bool:
                for inst in fleet:
                    after = [
                        as_unix(r.started_at)
                        for r in runs_of(engine, inst.id_instance)
                        if as_unix(r.started_at) >= released_at
                    ]
                    if after:
                        resumed[inst.id_instance] = min(after) - released_at
                return len(resumed) == len(fleet)

            _wait_for(all_resumed, 10, "syncs after the lock")
        finally:
            assert daemon.stop()
            client.close()
    records = [r for r in caplog.records if locked_at <= r.created <= released_at + 0.3]
    for inst in fleet:
        failed = [
            r
            for r in records
            if r.levelno >= logging.WARNING
            and str(inst.id_instance) in r.getMessage()
            and "could not be recorded" in r.getMessage()
        ]
        # about four ticks in four seconds; one line each
        assert len(failed) >= 3, [r.getMessage() for r in records]
        assert all("database" in r.getMessage() for r in failed)
    assert max(resumed.values()) <= resume_bound(1), resumed
    # the ticks lost to the lock were written once it was gone: failed (database), one per
    # logged line, and nothing else from that period (the lock holder rolled back). A tick
    # that started under the lock and ended after it may have written: it waits for the
    # file up to the busy timeout in each of its statements.
    for inst in fleet:
        during = [
            r
            for r in runs_of(engine, inst.id_instance)
            if locked_at + 0.5 <= as_unix(r.started_at) and as_unix(r.finished_at) < released_at
        ]
        assert len(during) >= 2, during
        assert {(r.status, r.error_kind) for r in during} == {("failed", "database")}, during
    assert any(
        "failed ticks kept while the database was unreachable" in r.getMessage()
        for r in caplog.records
    )
    check_history_invariants(engine)
    check_runs_consistent(engine)
    engine.dispose()


def test_sqlite_locked_daemon_waits_with_the_default_busy_timeout(
    sqlite_file: tuple[str, Path], tmp_path: Path
) -> None:
    """With the shipped 30 s busy timeout a 3 s lock only delays the writes: the running
    syncs wait, the scheduler skips (and logs) the ticks that fall due meanwhile."""
    db_url, path = sqlite_file
    engine = create_engine(db_url)  # plain reads: no BEGIN IMMEDIATE, never blocked (WAL)
    with Simulator(instances=2, chats=60, seed=29, rates=BUSY, tick_seconds=0.5) as sim:
        config = write_config(tmp_path / "etl.toml", sim, interval=1)
        d = Proc(
            ["--config", str(config), "--database-url", db_url, "run"],
            tmp_path / "daemon.log",
            tmp_path,
        )
        try:
            d.wait_until("two ticks per instance", lambda: _ok_runs(engine) >= 4)
            holder = _hold_exclusive(path)
            try:
                time.sleep(3.0)
                assert d.alive()
                runs_during = _ok_runs(engine)
            finally:
                released_at = time.time()
                holder.rollback()
                holder.close()
            d.wait_until(
                "syncs after the lock",
                lambda: all(
                    any(as_unix(r.finished_at) >= released_at for r in runs_of(engine, i))
                    for i in sim.instance_ids
                ),
                timeout=10,
            )
            time.sleep(1.5)
            rc = d.terminate()
        finally:
            d.close()
    log = d.text
    assert rc == 0, log
    assert "Traceback" not in log
    assert "maximum number of running instances reached" in log, log
    failed = scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'failed'")
    assert failed == 0
    assert _ok_runs(engine) > runs_during
    check_history_invariants(engine)
    check_runs_consistent(engine)
    engine.dispose()


# -- two processes, same instance ----------------------------------------------------------------


def _hold_instance_lock(db_url: str, iid: int) -> Callable[[], None]:
    """PostgreSQL: hold the instance's advisory lock (the sync's lock_instance key)."""
    eng = create_engine(etl.db.normalise_url(db_url))
    conn = eng.connect()
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": instance_lock_key(iid)})

    def release() -> None:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": instance_lock_key(iid)})
        conn.close()
        eng.dispose()

    return release


def test_two_sync_once_at_the_same_moment(migrated_db_url: str, tmp_path: Path) -> None:
    engine = make_engine(migrated_db_url)
    with Simulator(instances=1, chats=400, seed=31) as sim:
        iid = sim.instance_ids[0]
        config = write_config(tmp_path / "etl.toml", sim, interval=60)
        # both fetches are in flight together, so both writes start together
        sim.set_fault(iid, Fault(delay=1.0, times=2))
        release = (
            _hold_instance_lock(migrated_db_url, iid)
            if engine.dialect.name == "postgresql"
            else None
        )
        procs = [
            Proc(
                ["--config", str(config), "--database-url", migrated_db_url, "sync", "--once"],
                tmp_path / f"once{n}.log",
                tmp_path,
            )
            for n in (1, 2)
        ]
        try:
            if release is not None:  # PostgreSQL: both now wait on the same lock
                _wait_for(lambda: sim.request_count(iid) == 2, 30, "both fetches")
                time.sleep(1.5)
                release()
                release = None
            codes = [p.proc.wait(60) for p in procs]
        finally:
            if release is not None:
                release()
            for p in procs:
                p.close()
        logs = [p.text for p in procs]
    assert codes == [0, 0], logs
    assert all("Traceback" not in t for t in logs), logs
    assert sim.request_count(iid) == 2
    runs = rows(engine, "SELECT * FROM sync_runs ORDER BY finished_at")
    assert [r.status for r in runs] == ["ok", "ok"]
    # one applied the list; the other, serialised behind it, found nothing left to do
    assert sorted(r.chats_inserted for r in runs) == [0, 400]
    assert all(r.chats_updated == 0 and r.chats_removed == 0 for r in runs)
    assert scalar(engine, "SELECT COUNT(*) FROM chats") == 400
    assert scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history") == 400
    check_history_invariants(engine)
    check_runs_consistent(engine)
    if engine.dialect.name == "postgresql":
        waited = [t for t in logs if "another process is syncing it; waiting" in t]
        assert len(waited) >= 1, logs
    engine.dispose()


def test_a_waiting_sqlite_writer_says_so(tmp_path: Path, sqlite_template: Path) -> None:
    import shutil

    path = tmp_path / "w.db"
    shutil.copyfile(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    with Simulator(instances=1, chats=10, seed=37) as sim:
        inst = make_instance(sim)
        register_instances(engine, [inst])
        client = GreenApiClient()
        holder = _hold_exclusive(path)
        threading.Timer(1.0, holder.rollback).start()
        handler = _Collect()
        etl_logger = logging.getLogger("etl")
        level = etl_logger.level
        etl_logger.setLevel(logging.INFO)
        etl_logger.addHandler(handler)
        try:
            assert Syncer(engine, client).sync(inst).status == "ok"
        finally:
            etl_logger.removeHandler(handler)
            etl_logger.setLevel(level)
            client.close()
            holder.close()
    engine.dispose()
    assert any("wait" in m for m in handler.messages), handler.messages


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_two_daemons_on_the_same_instances(migrated_db_url: str, tmp_path: Path) -> None:
    engine = make_engine(migrated_db_url)
    pg = engine.dialect.name == "postgresql"
    with Simulator(instances=3, chats=80, seed=41, rates=BUSY, tick_seconds=0.5) as sim:
        config = write_config(tmp_path / "etl.toml", sim, interval=1)
        args = [
            "--config",
            str(config),
            "--database-url",
            migrated_db_url,
            "--log-level",
            "DEBUG",
            "run",
        ]
        daemons = [Proc(args, tmp_path / f"daemon{n}.log", tmp_path) for n in (1, 2)]
        try:
            for d in daemons:
                d.wait_until("scheduler started", lambda d=d: "scheduler started" in d.text)
            time.sleep(5.0)
            assert all(d.alive() for d in daemons)
            codes = [d.terminate() for d in daemons]
        finally:
            for d in daemons:
                d.close()
        logs = [d.text for d in daemons]
        assert codes == [0, 0], logs
        for t in logs:
            assert "Traceback" not in t and "unexpected error" not in t, t
        failed = rows(engine, "SELECT error_kind, error FROM sync_runs WHERE status <> 'ok'")
        assert failed == [], failed
        for iid in sim.instance_ids:
            runs = runs_of(engine, iid)
            assert len(runs) >= 3, (iid, len(runs))
            if pg:  # leases: one replica per instance, never two syncs at once
                for prev, nxt in zip(runs, runs[1:], strict=False):
                    assert as_unix(prev.finished_at) <= as_unix(nxt.started_at) + 1e-3
        if pg:
            # each instance is owned by one daemon: the fleet is split between the two
            claimed = [sum(int(n) for n in re.findall(r"claimed (\d+) instances", t)) for t in logs]
            assert sum(claimed) >= len(sim.instance_ids), claimed
        # both wrote into the same tables without breaking them; a last pass agrees
        final_pass_matches(engine, sim)
    check_history_invariants(engine)
    check_runs_consistent(engine)
    engine.dispose()


# -- a server that stops answering -------------------------------------------------------------


@pytest.mark.postgres
def test_postgresql_connections_carry_keepalive_and_timeouts(pg_db: str) -> None:
    """A dead peer must fail the tick, not hang its job (docs/reliability.md, bug 3): the
    libpq keepalive / tcp_user_timeout / connect_timeout defaults reach the connection, and
    one given in the URL wins."""
    eng = make_engine(pg_db)
    override = make_engine(
        make_url(pg_db).update_query_dict({"connect_timeout": "3"}).render_as_string(False)
    )
    try:
        for engine_, connect_timeout in ((eng, "10"), (override, "3")):
            with engine_.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
                assert params["connect_timeout"] == connect_timeout
                assert params["keepalives"] == "1"
                assert params["keepalives_idle"] == "30"
                assert params["tcp_user_timeout"] == "60000"
                assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        eng.dispose()
        override.dispose()


@pytest.mark.postgres
def test_a_server_that_accepts_but_never_answers_fails_within_connect_timeout() -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(silent.accept()[0])  # never a byte back

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    eng = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x?connect_timeout=1")
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception) as err, eng.connect():
            pass
        elapsed = time.monotonic() - t0
        assert "timeout" in str(err.value).lower()
        assert accepted, "the connection never reached the silent server"
        assert elapsed < 5, elapsed
    finally:
        stop.set()
        t.join()
        eng.dispose()
        silent.close()
        for s in accepted:
            s.close()


def test_failed_ticks_kept_during_an_outage_are_bounded_and_written_in_order(
    sqlite_file: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(etl.db, "SQLITE_BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(etl.sync.backlog, "UNRECORDED_LIMIT", 3)
    caplog.set_level(logging.INFO, logger="etl")
    db_url, path = sqlite_file
    engine = make_engine(db_url)
    with Simulator(instances=1, chats=20, seed=3) as sim:
        inst = make_instance(sim, sim.instance_ids[0])
        register_instances(engine, [inst])
        client = GreenApiClient()
        syncer = Syncer(engine, client)
        holder = _hold_exclusive(path)
        try:
            outs = [syncer.sync(inst) for _ in range(5)]
        finally:
            holder.rollback()
            holder.close()
        assert [o.error_kind for o in outs] == ["database"] * 5
        assert all(o.sync_run_id is None for o in outs)
        assert scalar(engine, "SELECT COUNT(*) FROM sync_runs") == 0
        assert syncer.sync(inst).status == "ok"
        client.close()
    recorded = runs_of(engine, inst.id_instance)
    # the last 3 of the 5 lost ticks (the limit), oldest first, then the ok one
    assert [(r.status, r.error_kind) for r in recorded] == [("failed", "database")] * 3 + [
        ("ok", None)
    ]
    lost_starts = [as_unix(r.started_at) for r in recorded[:3]]
    assert lost_starts == sorted(lost_starts)
    assert lost_starts[0] == pytest.approx(outs[2].started_at.timestamp(), abs=1e-3)
    assert any("2 older ones were dropped" in r.getMessage() for r in caplog.records)
    engine.dispose()


# -- the real server stopped and started ---------------------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"private PostgreSQL server: {reason}")
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.postgres
def test_postgresql_server_stopped_and_started(private_pg: PrivatePostgres, tmp_path: Path) -> None:
    """The real thing: ``pg_ctl stop -m fast`` under a running daemon (every connection
    closed, nothing listening), 5 s down, ``pg_ctl start``. No crash, a log line per lost
    tick, the lost ticks in ``sync_runs`` afterwards, syncing back at the next tick."""
    engine = make_engine(private_pg.url)
    upgrade(engine)
    try:
        with Simulator(instances=3, chats=150, seed=31, rates=BUSY, tick_seconds=0.5) as sim:
            config = write_config(tmp_path / "etl.toml", sim, interval=INTERVAL)
            d = Proc(
                ["--config", str(config), "--database-url", private_pg.url, "run"],
                tmp_path / "daemon.log",
                tmp_path,
            )
            try:
                d.wait_until("two ticks per instance", lambda: _ok_runs(engine) >= 6)
                engine.dispose()  # the test's own pooled connections die with the server
                stopped_at = time.time()
                private_pg.stop()
                time.sleep(5.0)
                assert d.alive(), d.text
                private_pg.start()
                started_at = time.time()
                resumed: dict[int, float] = {}

                def all_resumed() -> bool:
                    resumed.update(first_ok_after(engine, sim.instance_ids, started_at))
                    return len(resumed) == len(sim.instance_ids)

                d.wait_until("every instance synced again", all_resumed, timeout=15)
                time.sleep(1.0)
                rc = d.terminate()
            finally:
                d.close()
            log = d.text
            assert rc == 0, log
            assert "Traceback" not in log and "unexpected error" not in log, log
            lines = log_lines(log)
            for iid in sim.instance_ids:
                logged = [
                    msg
                    for when, level, msg in lines
                    if stopped_at <= when <= started_at
                    and level == "ERROR"
                    and str(iid) in msg
                    and "could not be recorded yet" in msg
                ]
                assert len(logged) >= 3, f"{iid}: {len(logged)} lines in a 5 s outage\n{log}"
                assert_lost_ticks_recorded(engine, iid, stopped_at, started_at)
            assert max(resumed.values()) <= resume_bound(INTERVAL), resumed
            check_history_invariants(engine)
            check_runs_consistent(engine)
            final_pass_matches(engine, sim)
        print(f"resumed after pg_ctl start (s): {resumed}")
    finally:
        engine.dispose()


def test_a_sqlite_file_that_turns_to_garbage_fails_ticks_without_a_crash(
    sqlite_file: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The database file is overwritten under a running syncer: each tick is a `database`
    failure (logged, kept for later), never an unexpected exception."""
    caplog.set_level(logging.INFO, logger="etl")
    db_url, path = sqlite_file
    engine = make_engine(db_url)
    with Simulator(instances=1, chats=20, seed=5) as sim:
        inst = make_instance(sim, sim.instance_ids[0])
        register_instances(engine, [inst])
        client = GreenApiClient()
        syncer = Syncer(engine, client)
        assert syncer.sync(inst).status == "ok"
        engine.dispose()  # the next tick opens the file afresh
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.write_bytes(b"this is not a database" * 1000)
        outs = [syncer.sync(inst) for _ in range(2)]
        client.close()
    assert [(o.status, o.error_kind) for o in outs] == [("failed", "database")] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not be recorded yet" in m for m in messages) == 2, messages
    assert not any("unexpected" in m for m in messages)
    engine.dispose()

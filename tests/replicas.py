"""Helpers for tests that run several `etl run` replicas as real processes on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from etl.simulator import RequestLog, Simulator


def start_replica(
    config: Path, url: str, log: Path, *, workers: int = 4, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """One `etl run` process (no status page, so that replicas never fight for a port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etl",
            "--config",
            str(config),
            "--database-url",
            url,
            "run",
            "--workers",
            str(workers),
            "--no-http",
            "--log-level",
            "INFO",
            *extra,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def stop_replicas(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGCONT (a stopped process cannot handle SIGTERM), SIGTERM, then SIGKILL if needed."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@contextlib.contextmanager
def replicas(
    n: int, config: Path, url: str, logs: Path, **kwargs: Any
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_replica(config, url, logs / f"replica{i}.log", **kwargs) for i in range(n)]
    try:
        yield procs
    finally:
        stop_replicas(procs)


def owner_pid(engine: Engine, instance_id: int) -> int | None:
    """The pid of the replica holding ``instance_id`` (its replica id is host:pid:nonce)."""
    with engine.connect() as conn:
        owner = conn.execute(
            text("SELECT lease_owner FROM instance_sync_state WHERE instance_id = :i"),
            {"i": instance_id},
        ).scalar()
    if not owner:
        return None
    return int(str(owner).split(":")[-2])


def wait_for(check: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; that value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    return None


def history_flips(engine: Engine, instance_id: int) -> int:
    """History rows whose setting time is older than the row before them: a stale list
    written after a newer one (every change of the test's feeder has a newer time)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT COUNT(*) FROM (SELECT ephemeral_setting_at, LAG(ephemeral_setting_at)"
                    " OVER (PARTITION BY chat_id ORDER BY id) AS before"
                    " FROM chat_ephemeral_history WHERE instance_id = :i) h"
                    " WHERE ephemeral_setting_at < before"
                ),
                {"i": instance_id},
            ).scalar_one()
        )


class Staller:
    """Stops the replica that owns an instance with SIGSTOP a moment after its getChats
    answer is on the wire (so that it holds an answer it has not written yet)."""

    def __init__(self, sim: Simulator, engine: Engine, instance_id: int) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self._armed = threading.Event()
        self._stops: queue.Queue[tuple[int, datetime]] = queue.Queue()
        #: when each stall began (the database's clock is the same machine's)
        self.stopped: list[datetime] = []
        sim.on_answer(self._on_answer)

    def _on_answer(self, entry: RequestLog) -> None:
        if not self._armed.is_set() or entry.id_instance != self.instance_id:
            return
        if entry.status != 200:
            return
        self._armed.clear()
        pid = owner_pid(self.engine, self.instance_id)
        if pid is None:
            self._armed.set()
            return
        time.sleep(0.005)  # the answer has arrived; the owner is decoding it
        os.kill(pid, signal.SIGSTOP)
        self._stops.put((pid, datetime.now(UTC)))

    def stall(self, until: Callable[[datetime], Any], timeout: float = 30) -> bool:
        """Stop the owner at its next answer; resume it once ``until(stopped_at)`` holds
        (or after ``timeout``); True when it held."""
        self._armed.set()
        pid, stopped_at = self._stops.get(timeout=timeout)
        self.stopped.append(stopped_at)
        try:
            held = wait_for(lambda: until(stopped_at), timeout)
        finally:
            os.kill(pid, signal.SIGCONT)
        return bool(held)

    def close(self) -> None:
        self._armed.clear()


def feed_flips(sim: Simulator, instance_id: int, stop: threading.Event) -> None:
    """Every half second, flip one chat's setting, stamped with the current time (so that
    any list written after a newer one shows as a history row with an older setting).

    Every element also gets a new value of a field the API does not have, so that no
    element is byte-identical to the last list's: each one is parsed again, and decoding
    a long list takes long enough for ``Staller`` to stop its owner before the write. The
    value counts up: a value that alternated would make a list fetched an even number of
    flips later (an interval of 3 s, say) identical to the last one but for one element."""
    chats = sim.chats(instance_id)
    step = 0
    while not stop.wait(0.5):
        step += 1
        chats[0]["ephemeralExpiration"] = 86400 if step % 2 else 604800
        chats[0]["ephemeralSettingTimestamp"] = int(time.time())
        for chat in chats:
            chat["seen"] = step
        sim.set_chats(instance_id, chats)


def count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def newer_ok_run(engine: Engine, instance_id: int) -> Callable[[datetime], bool]:
    """``until`` for ``Staller.stall``: another replica wrote an ok run after the stop."""
    sql = (
        "SELECT COUNT(*) FROM sync_runs WHERE instance_id = :i AND status = 'ok'"
        " AND started_at > :t"
    )
    return lambda at: count(engine, sql, i=instance_id, t=at) > 0


def run_at(engine: Engine, instance_id: int, at: datetime) -> Any:
    """The run of the instance that was going on at ``at`` (a stalled tick's), if any."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT status, error_kind FROM sync_runs WHERE instance_id = :i"
                " AND started_at <= :t AND finished_at >= :t"
            ),
            {"i": instance_id, "t": at},
        ).first()

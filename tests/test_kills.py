"""SIGKILL at random points while the daemon syncs, many times over, on SQLite and PostgreSQL.

The daemon (``etl run``, 1 s interval, three instances whose lists change every 0.3 s) is
started, killed with SIGKILL and started again, ``KILLS`` times per backend (30 by default,
so 60 per CI run; ``ETL_TEST_KILLS=200`` for more). One kill in five lands a random
0.1-1.5 s after the process started, to hit the start-up; two in five a random 0.1-1.5 s
after its scheduler started; two in five are aimed: 0-20 ms after the simulator received
the daemon's 1st-4th request, inside a sync. A sync of these lists takes a few tens of
milliseconds, so random moments alone hit one too rarely to be sure of (a CI run once saw
none in 30 kills); the test asserts that at least one kill interrupted a sync in flight.
After every kill the database must satisfy ``check_history_invariants`` and
``check_runs_consistent`` (no ``sync_runs`` row without its data, no data without its
run). At the end a real ``python -m etl run`` resumes, exits 0 on SIGTERM, and a final pass
stores exactly the simulator's lists.

To fit the kills into the CI budget, the killed processes are forked from a "zygote" that
has already imported ``etl``; each then runs exactly what ``python -m etl run`` runs
(``etl.cli.main()`` with the same arguments) in a fresh process. This skips the ~1 s of
interpreter start-up and imports per restart, none of the daemon's own start-up.
``ETL_TEST_KILL_EXEC=1`` starts a genuine ``python -m etl run`` for every restart instead.

On PostgreSQL a killed replica keeps its leases for 1.25 intervals (by design: see
etl/leases.py and test_scaleout), so the next process would spend its first second or two
waiting for them instead of syncing; after each kill (and after the invariants are checked)
the test expires them, as time would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from etl.db import make_engine
from etl.simulator import ChangeRates, Simulator
from tests.factories import check_history_invariants, rows, scalar
from tests.test_faults import check_runs_consistent
from tests.test_outages import Proc, child_env, final_pass_matches, write_config

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("ETL_TEST_KILLS", "30"))  # per backend
EXEC = os.environ.get("ETL_TEST_KILL_EXEC") == "1"
# every tick writes (renames, archive flips, ephemeral changes); as many chats appear as
# vanish, so the lists stay ~400 long however long it runs. The mass-removal guard stays on:
# an instance left unsynced for a while sees many chats gone at once and must confirm it.
RATES = ChangeRates(new=0.005, rename=0.03, archive=0.03, ephemeral=0.05, removal=0.005)

ZYGOTE = r"""
import os, signal, sys, traceback
import etl.cli
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    log_path, *args = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.argv = ["etl", *args]
        code = 1
        try:
            etl.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
"""


class Zygote:
    """Forks ``etl`` processes that have skipped the interpreter start-up."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def spawn(self, args: list[str], log: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\t".join([str(log), *args]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _kill_and_reap(pid: int, popen: subprocess.Popen[bytes] | None) -> None:
    os.kill(pid, signal.SIGKILL)
    if popen is not None:
        popen.wait(10)
        return
    deadline = time.monotonic() + 10
    while True:  # a zygote child: the kernel reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.005)


@dataclass
class KillStats:
    kills: int = 0
    during_sync: int = 0  # a request was answered, its run never committed
    runs: int = 0
    seconds: float = 0.0
    delays: list[float] = field(default_factory=list)
    check_seconds: float = 0.0


def _attempts(engine: Engine) -> int:
    return int(scalar(engine, "SELECT COALESCE(SUM(attempts), 0) FROM sync_runs"))


def test_sigkill_at_random_points_keeps_the_invariants(
    migrated_db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(migrated_db_url)
    pg = engine.dialect.name == "postgresql"
    rnd = random.Random(f"kills:{migrated_db_url.split(':')[0]}")
    stats = KillStats()
    zygote = None if EXEC else Zygote()
    try:
        with Simulator(instances=3, chats=400, seed=47, rates=RATES, tick_seconds=0.3) as sim:
            config = write_config(tmp_path / "etl.toml", sim, interval=1, workers=4)
            args = ["--config", str(config), "--database-url", migrated_db_url, "run"]
            t_start = time.monotonic()
            for k in range(KILLS):
                requests0, attempts0 = sim.request_count(), _attempts(engine)
                log = tmp_path / f"run{k}.log"
                popen = None
                if zygote is not None:
                    pid = zygote.spawn(args, log)
                else:
                    with log.open("wb") as err:
                        popen = subprocess.Popen(
                            [sys.executable, "-m", "etl", *args],
                            cwd=tmp_path,
                            env=child_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=err,
                        )
                    pid = popen.pid
                delay = rnd.uniform(0.1, 1.5)
                try:
                    if k % 5 == 0:  # one kill in five lands during start-up
                        time.sleep(delay)
                    elif k % 2:  # at a random moment of the running daemon
                        _wait_for_line(log, "scheduler started")
                        time.sleep(delay)
                    else:  # aimed: just after a getChats request was received
                        nth = requests0 + rnd.randint(1, 4)
                        _wait_for_requests(sim, nth)
                        delay = rnd.uniform(0.0, 0.02)
                        time.sleep(delay)
                finally:  # never leave a daemon behind, whatever failed
                    _kill_and_reap(pid, popen)
                stats.kills += 1
                stats.delays.append(delay)
                if pg:  # let the next process claim at once (see the module docstring)
                    _expire_leases(engine)
                # whatever the kill interrupted, what is stored is consistent
                t_check = time.monotonic()
                check_history_invariants(engine)
                check_runs_consistent(engine)
                lost = (sim.request_count() - requests0) - (_attempts(engine) - attempts0)
                stats.during_sync += lost > 0
                stats.check_seconds += time.monotonic() - t_check
            stats.seconds = time.monotonic() - t_start
            stats.runs = int(scalar(engine, "SELECT COUNT(*) FROM sync_runs"))

            # a real `python -m etl run` takes over, syncs, and stops cleanly
            before = int(scalar(engine, "SELECT COALESCE(MAX(id), 0) FROM sync_runs"))
            d = Proc(args, tmp_path / "final.log", tmp_path)
            try:
                d.wait_until(
                    "a tick of every instance",
                    lambda: _instances_synced_since(engine, before) == len(sim.instance_ids),
                    timeout=30,
                )
                rc = d.terminate()
            finally:
                d.close()
            assert rc == 0, d.text
            assert "Traceback" not in d.text, d.text
            check_history_invariants(engine)
            check_runs_consistent(engine)
            final_pass_matches(engine, sim)
            check_history_invariants(engine)
            check_runs_consistent(engine)
        failed = rows(
            engine,
            "SELECT error_kind, COUNT(*) AS n FROM sync_runs WHERE status <> 'ok' "
            "GROUP BY error_kind",
        )
    finally:
        if zygote is not None:
            zygote.close()
        engine.dispose()
    print(
        f"\n{migrated_db_url.split(':')[0]}: {stats.kills} SIGKILLs in {stats.seconds:.1f}s "
        f"({'exec' if EXEC else 'zygote'}), {stats.during_sync} interrupted a sync in flight, "
        f"{stats.runs} sync_runs rows written between kills; checks took "
        f"{stats.check_seconds:.1f}s; non-ok: "
        f"{[(r.error_kind, r.n) for r in failed]}"
    )
    assert stats.kills == KILLS
    assert stats.runs > 0, "no tick ever completed between kills"
    # the kills landed during syncs, not only during start-up
    assert stats.during_sync >= 1, stats  # random timing: at least one kill mid-sync


def _wait_for_line(log: Path, needle: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not log.exists() or needle not in log.read_text(encoding="utf-8", errors="replace"):
        assert time.monotonic() < deadline, f"no {needle!r} in {log}"
        time.sleep(0.01)


def _wait_for_requests(sim: Simulator, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while sim.request_count() < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests in {timeout}s"
        time.sleep(0.001)


def _expire_leases(engine: Engine) -> None:
    """What ``lease_seconds`` after a crash would do: the dead replica's lease runs out
    (test_scaleout and test_fleet_chaos prove the real expiry)."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE replicas SET lease_until = now() - interval '1 second'"))


def _instances_synced_since(engine: Engine, run_id: int) -> int:
    return int(
        scalar(
            engine,
            "SELECT COUNT(DISTINCT instance_id) FROM sync_runs WHERE id > :r AND status = 'ok'",
            r=run_id,
        )
    )

"""Three `etl run` replicas over 300 instances while replicas are killed (SIGKILL) and
paused past their lease (SIGSTOP/SIGCONT), again and again: every instance keeps being
synced once per interval, never twice at once, is taken over within one interval plus the
lease, and an instance that keeps failing is polled at its backoff's pace whichever
replica holds it (requests counted at the simulator). Each blow (a kill and a pause at
once) comes once every instance was synced since the one before."""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import text

from etl.db import make_engine
from etl.simulator import ChangeRates, Fault, Simulator
from tests.factories import check_history_invariants
from tests.replicas import count, replicas, start_replica, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

INSTANCES = 300
INTERVAL = 4
HEARTBEAT = 1.0
LEASE = 3.0
#: how many kills and how many pauses (the issue asks for at least 20 of each)
CYCLES = int(os.environ.get("ETL_TEST_CHAOS_CYCLES", "20"))
#: instances whose token is wrong from the start: they back off, from the first failure,
#: to at most BACKOFF_MAX between polls
BROKEN = 10
BACKOFF_MAX = 4 * INTERVAL
TOKEN = "c4" * 25
RATES = ChangeRates(new=0.002, rename=0.01, archive=0.0, ephemeral=0.02, removal=0.0)


def _config(sim: Simulator, path: Path) -> Path:
    text_ = sim.config_toml(interval_seconds=INTERVAL)
    text_ = text_.replace(
        "[defaults]\n",
        f"[defaults]\nbackoff_max_seconds = {BACKOFF_MAX}\ntimeout_seconds = 2\n",
        1,
    )
    text_ += f"\n[scheduler]\nheartbeat_seconds = {HEARTBEAT}\nlease_seconds = {LEASE}\n"
    path.write_text(text_, encoding="utf-8")
    path.chmod(0o600)
    return path


def test_kills_and_pauses_keep_one_sync_per_interval(pg_db: str, tmp_path: Path) -> None:
    rnd = random.Random(14)
    engine = make_engine(pg_db)
    with Simulator(instances=INSTANCES, chats=3, token=TOKEN, rates=RATES, tick_seconds=2) as sim:
        broken = sim.instance_ids[:BROKEN]
        for iid in broken:
            sim.set_fault(iid, Fault(status=401))
        config = _config(sim, tmp_path / "etl.toml")
        kills = pauses = 0
        events: list[tuple[float, str]] = []
        with replicas(3, config, pg_db, tmp_path, workers=6) as procs:
            healthy = "SELECT COUNT(DISTINCT instance_id) FROM sync_runs WHERE status = 'ok'"
            assert wait_for(lambda: count(engine, healthy) == INSTANCES - BROKEN, 90)
            t0, t0_wall = time.monotonic(), time.time()
            since = healthy + " AND started_at > to_timestamp(:t)"
            recoveries = []
            for _ in range(CYCLES):
                victim, sleeper = rnd.sample(range(3), 2)
                hit = time.time()
                events.append((hit, f"kill {victim} pause {sleeper}"))
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(10)
                kills += 1
                os.kill(procs[sleeper].pid, signal.SIGSTOP)
                time.sleep(LEASE + HEARTBEAT + rnd.uniform(0, HEARTBEAT))
                os.kill(procs[sleeper].pid, signal.SIGCONT)
                events.append((time.time(), f"resume {sleeper}"))
                pauses += 1
                log = tmp_path / f"replica{victim}.log"
                procs[victim] = start_replica(config, pg_db, log, workers=6)
                events.append((time.time(), f"restart {victim}"))

                # the next blow only once every instance was synced since this one: each
                # gap then holds one takeover, which is what the bound below is about (a
                # kill that lands on the replica that has just claimed a paused one's
                # instances, before its first tick, makes a gap of two takeovers and more)
                def synced(t: float = hit) -> bool:
                    return count(engine, since, t=t) == INSTANCES - BROKEN

                recovered = wait_for(synced, 60)
                assert recovered, f"not every instance synced within 60 s of {events[-3:]}"
                recoveries.append(time.time() - hit)
                time.sleep(rnd.uniform(0.5, INTERVAL / 2))
            # settle, then a quiet stretch to measure
            time.sleep(2 * INTERVAL)
            t1 = time.monotonic()
        requests = [r for r in sim.requests if r.method == "getChats" and t0 <= r.at <= t1]
    try:
        gaps = _gaps(engine, since=t0_wall)
        worst = max(gaps, key=lambda i: max(gaps[i], default=0))
        closest = min(gaps, key=lambda i: min(gaps[i], default=INTERVAL))
        timeline = _timeline(engine, worst)
        close_timeline = _timeline(engine, closest)
        failed = count(
            engine,
            "SELECT COUNT(*) FROM sync_runs WHERE status = 'failed'"
            " AND error_kind NOT IN ('lease_lost', 'unauthorized', 'timeout', 'database')",
        )
        lost = count(engine, "SELECT COUNT(*) FROM sync_runs WHERE error_kind = 'lease_lost'")
        check_history_invariants(engine)
    finally:
        engine.dispose()
    span = t1 - t0
    per_broken = [sum(1 for r in requests if r.id_instance == iid) for iid in broken]
    all_gaps = [g for gs in gaps.values() for g in gs]
    print(
        f"kills={kills} pauses={pauses} span={span:.0f}s lease_lost={lost} "
        f"gap median={statistics.median(all_gaps):.2f}s max={max(all_gaps):.2f}s "
        f"min={min(all_gaps):.2f}s broken polls={per_broken} "
        f"(every interval would be {span / INTERVAL:.0f})"
    )
    print(f"every instance synced again {max(recoveries):.1f} s after a blow at most")
    print(f"events {events}")
    print(f"longest gap: instance {worst}: runs {timeline}")
    print(f"shortest gap: instance {closest}: runs {close_timeline}")
    assert kills >= CYCLES and pauses >= CYCLES
    assert failed == 0
    # never two syncs of one instance at once, nor one right after the other: two owners
    # would sync it within moments of each other (a late job can shorten one gap, hence a
    # quarter of an interval rather than a whole one)
    assert min(all_gaps) >= 0.25 * INTERVAL, sorted(all_gaps)[:5]
    # taken over within one interval plus the lease (and a heartbeat to claim it, and one
    # more interval of slack for a loaded machine's late jobs), even with two of the three
    # replicas out at once
    assert max(all_gaps) <= 2 * INTERVAL + LEASE + 2 * HEARTBEAT, sorted(all_gaps)[-5:]
    # about one sync per interval through all of it (a loaded machine runs jobs late, so
    # the bound is loose; double work would push it above one per interval)
    per_instance = [len(gs) + 1 for gs in gaps.values()]
    assert statistics.median(per_instance) <= span / INTERVAL + 4
    # the broken ones backed off whoever held them: at most one poll per BACKOFF_MAX (plus
    # the first few doubling steps and a takeover's first tick), far from one per interval
    assert max(per_broken) <= span / BACKOFF_MAX + 4, per_broken


def _timeline(engine, iid: int) -> list[tuple[float, str, str | None]]:  # type: ignore[no-untyped-def]
    """The instance's runs: (started_at as unix time, status, error_kind)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM started_at) AS at, status, error_kind FROM sync_runs"
                " WHERE instance_id = :i ORDER BY started_at"
            ),
            {"i": iid},
        ).all()
    return [(round(float(r.at), 2), r.status, r.error_kind) for r in rows]


def _gaps(engine, *, since: float) -> dict[int, list[float]]:  # type: ignore[no-untyped-def]
    """Seconds between consecutive ``ok`` syncs of each instance, from ``since`` (unix
    time) on: the first loads before it, late on a loaded machine, would make the gap to
    the next tick short."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT instance_id, gap FROM (SELECT instance_id, started_at,"
                " EXTRACT(EPOCH FROM started_at - LAG(started_at) OVER ("
                "PARTITION BY instance_id ORDER BY started_at)) AS gap"
                " FROM sync_runs WHERE status = 'ok') g"
                " WHERE started_at >= to_timestamp(:since)"
            ),
            {"since": since},
        ).all()
    out: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r.gap is not None:
            out[r.instance_id].append(float(r.gap))
    return out

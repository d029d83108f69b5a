"""chatsync through a real PgBouncer in transaction mode (Debian 12's 1.18, which has no
prepared-statement support in that mode): psycopg's automatic prepared statements break
there, ``[database] prepare_threshold = "off"`` mends it, and two daemon replicas, fenced
writes included, run through it cleanly."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from etl.client import GreenApiClient
from etl.db import make_engine
from etl.simulator import ChangeRates, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import REQUIRE_PG, make_instance
from tests.factories import rows
from tests.pgbouncer import BINARY, pgbouncer
from tests.replicas import (
    Staller,
    count,
    feed_flips,
    history_flips,
    newer_ok_run,
    replicas,
    run_at,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

if not os.path.exists(BINARY):  # CI installs it (.ci/run); there its absence is a failure
    if REQUIRE_PG:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    pytestmark.append(pytest.mark.skip(reason="pgbouncer is not installed"))

QUIET = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)


def _ticks(url: str, threshold: int | None, sim: Simulator, rounds: int) -> Counter[str]:
    """``rounds`` passes over every instance, 8 at a time, through ``url``; the errors."""
    engine = make_engine(url, pool_size=8, prepare_threshold=threshold)
    client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
    fleet = [make_instance(sim, iid) for iid in sim.instance_ids]
    errors: Counter[str] = Counter()
    try:
        register_instances(engine, fleet)
        syncer = Syncer(engine, client)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(rounds):
                sim.step()
                for outcome in pool.map(syncer.sync, fleet):
                    if outcome.status == "failed":
                        errors[str(outcome.error)[:60]] += 1
    finally:
        client.close()
        engine.dispose()
    return errors


@pytest.mark.parametrize("threshold", [5, None], ids=["prepared", "off"])
def test_prepared_statements_and_pgbouncer_transaction_mode(
    pg_db: str, tmp_path: Path, threshold: int | None
) -> None:
    """psycopg's default (prepare after 5 runs) fails through PgBouncer 1.18 in
    transaction mode, where consecutive transactions use different server connections;
    with prepared statements off every tick goes through."""
    with (
        pgbouncer(pg_db, tmp_path / "pgbouncer", pool_size=3) as url,
        Simulator(instances=8, chats=40, seed=5) as sim,
    ):
        errors = _ticks(url, threshold, sim, rounds=12)
    if threshold is None:
        assert errors == Counter(), errors
    else:
        assert any("prepared statement" in e for e in errors), errors


def test_two_replicas_through_pgbouncer(pg_db: str, tmp_path: Path) -> None:
    """Two `etl run` replicas share 20 instances through PgBouncer with
    ``prepare_threshold = "off"``; the owner of one of them is stalled three times past its
    lease, and its stale writes are refused through PgBouncer too."""
    engine = make_engine(pg_db)
    feeding = threading.Event()
    with (
        pgbouncer(pg_db, tmp_path / "pgbouncer", pool_size=6) as url,
        Simulator(instances=20, chats=30, seed=9, rates=QUIET) as sim,
    ):
        watched = sim.instance_ids[0]
        # a long list for the watched instance, so the stall lands before its write
        sim.set_chats(watched, Simulator(instances=1, chats=10_000, seed=1).chats(1101000001))
        staller = Staller(sim, engine, watched)
        config = tmp_path / "etl.toml"
        text = sim.config_toml(interval_seconds=3)
        config.write_text(text + '\n[database]\nprepare_threshold = "off"\n', encoding="utf-8")
        config.chmod(0o600)
        threading.Thread(target=feed_flips, args=(sim, watched, feeding), daemon=True).start()
        ok = "SELECT COUNT(DISTINCT instance_id) FROM sync_runs WHERE status = 'ok'"
        try:
            with replicas(2, config, url, tmp_path):
                assert wait_for(lambda: count(engine, ok) == 20, 60), "not every instance synced"
                for _ in range(3):
                    assert staller.stall(until=newer_ok_run(engine, watched))
                    time.sleep(3)
                since = time.monotonic()
                time.sleep(4)
                until = time.monotonic()
        finally:
            feeding.set()
            staller.close()
        requests_after = [r for r in sim.requests if since <= r.at <= until]
    try:
        failed = count(
            engine,
            "SELECT COUNT(*) FROM sync_runs WHERE status = 'failed'"
            " AND error_kind NOT IN ('lease_lost', 'timeout', 'database')",
        )
        # a tick of another instance that the stopped replica had inside its write
        # transaction is ended by the server (idle in transaction past the lease): a
        # database failure, but only one that a stall went through
        database_failures = rows(
            engine,
            "SELECT started_at, finished_at FROM sync_runs"
            " WHERE status = 'failed' AND error_kind = 'database'",
        )
        unexplained = [
            (start, end)
            for start, end in database_failures
            if not any(start <= at <= end for at in staller.stopped)
        ]
        stalled = [run_at(engine, watched, at) for at in staller.stopped]
        flips = history_flips(engine, watched)
    finally:
        engine.dispose()
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("replica*.log"))
    assert "prepared statement" not in logs
    assert "Traceback" not in logs
    assert failed == 0, logs[-3000:]
    assert unexplained == [], (unexplained, staller.stopped)
    assert flips == 0
    assert all(r is not None and r.status == "failed" for r in stalled), stalled
    assert any(r.error_kind == "lease_lost" for r in stalled if r is not None), stalled
    # both kept syncing the whole fleet after the stalls
    assert {r.id_instance for r in requests_after} == set(sim.instance_ids)

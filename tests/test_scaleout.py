"""Several `etl run` replicas on one PostgreSQL share the fleet: each instance is synced by
exactly one replica per interval, and a killed replica's instances are taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from etl.db import make_engine
from etl.simulator import ChangeRates, Simulator
from tests.conftest import _new_pg_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

INSTANCES = 300
INTERVAL = 4
TOKEN = "5c" * 25


@pytest.fixture
def pg_url(pg_admin: Engine, pg_template: str) -> Iterator[str]:
    url, drop = _new_pg_database(pg_admin, template=pg_template)
    yield url
    drop()


def _start(config: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
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
            "4",
            "--log-level",
            "INFO",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _per_instance(sim: Simulator, since: float, until: float) -> Counter[int]:
    return Counter(r.id_instance for r in sim.requests if r.id_instance and since <= r.at < until)


def test_three_replicas_share_the_fleet_and_take_over(pg_url: str, tmp_path: Path) -> None:
    rates = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)
    with Simulator(instances=INSTANCES, chats=3, token=TOKEN, rates=rates) as sim:
        config = tmp_path / "etl.toml"
        config.write_text(sim.config_toml(interval_seconds=INTERVAL), encoding="utf-8")
        config.chmod(0o600)
        procs = [_start(config, pg_url, tmp_path / f"replica{i}.log") for i in range(3)]
        engine = make_engine(pg_url)
        try:
            # warm-up: every replica up, leases settled (two intervals)
            time.sleep(2.5 * INTERVAL)
            t0 = time.monotonic()
            time.sleep(3 * INTERVAL)
            t1 = time.monotonic()
            steady = _per_instance(sim, t0, t1)
            assert set(steady) == set(sim.instance_ids), "some instance was never synced"
            # exactly one sync per instance per interval (window edges allow +-1)
            assert all(2 <= n <= 4 for n in steady.values()), Counter(steady.values())
            assert sum(steady.values()) <= INSTANCES * 3 + INSTANCES // 10

            with engine.connect() as conn:
                owners = dict(
                    conn.execute(
                        text(
                            "SELECT s.lease_owner, COUNT(*) FROM instance_sync_state s "
                            "JOIN replicas r ON r.replica_id = s.lease_owner "
                            "WHERE r.lease_until > now() GROUP BY s.lease_owner"
                        )
                    ).all()
                )
            assert len(owners) == 3, owners  # the work is shared by all three
            assert max(owners.values()) <= INSTANCES // 3 + 1

            # kill one replica hard: its leases expire and the others take over
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(timeout=10)
            time.sleep(2.5 * INTERVAL)
            t2 = time.monotonic()
            time.sleep(3 * INTERVAL)
            t3 = time.monotonic()
            after = _per_instance(sim, t2, t3)
            assert set(after) == set(sim.instance_ids), "orphaned instances were not taken over"
            assert all(2 <= n <= 4 for n in after.values()), Counter(after.values())

            # never two syncs of one instance within half an interval (no double work)
            with engine.connect() as conn:
                gaps = conn.execute(
                    text(
                        "SELECT MIN(gap) FROM (SELECT EXTRACT(EPOCH FROM started_at - LAG("
                        "started_at) OVER (PARTITION BY instance_id ORDER BY started_at)) AS gap "
                        "FROM sync_runs) g"
                    )
                ).scalar_one()
                failed = conn.execute(
                    text("SELECT COUNT(*) FROM sync_runs WHERE status = 'failed'")
                ).scalar_one()
            assert gaps is not None and float(gaps) > INTERVAL * 0.5
            assert failed == 0
        finally:
            engine.dispose()
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

"""A replica that stalls between its fetch and its write cannot write its older list after
the replica that took the instance over wrote a newer one (fenced writes).

Two `etl run` replicas share one instance on PostgreSQL. The chat list changes every half
second (one chat's disappearing-message setting, with a newer setting time each time). The
replica that owns the instance is stopped with SIGSTOP a moment after its getChats answer
is on the wire, so that it holds an answer it has not written; it stays stopped until the
other replica has taken the instance over and written a newer list, then gets SIGCONT and
goes on with its write. That write must be refused: the tick is recorded as
``lease_lost`` and the history never goes back to an older setting.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from etl.db import make_engine
from etl.simulator import ChangeRates, Simulator
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

INTERVAL = 2
#: how many times the owner is stopped (the issue asks for at least 20)
STALLS = int(os.environ.get("ETL_TEST_STALLS", "20"))
#: a long list, so that decoding it takes long enough for SIGSTOP to land before the write
CHATS = 10_000
TOKEN = "5f" * 25
QUIET = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)


def test_a_stalled_owner_cannot_write_an_older_list(pg_db: str, tmp_path: Path) -> None:
    engine = make_engine(pg_db)
    feeding = threading.Event()
    with Simulator(instances=1, chats=CHATS, token=TOKEN, rates=QUIET) as sim:
        iid = sim.instance_ids[0]
        staller = Staller(sim, engine, iid)
        config = tmp_path / "etl.toml"
        config.write_text(sim.config_toml(interval_seconds=INTERVAL), encoding="utf-8")
        config.chmod(0o600)
        threading.Thread(target=feed_flips, args=(sim, iid, feeding), daemon=True).start()
        try:
            with replicas(2, config, pg_db, tmp_path):
                ok = "SELECT COUNT(*) FROM sync_runs WHERE instance_id = :i AND status = 'ok'"
                assert wait_for(lambda: count(engine, ok, i=iid) >= 2, 60), "no sync"
                for _ in range(STALLS):
                    # the other replica takes the instance over and writes a newer list
                    taken = staller.stall(until=newer_ok_run(engine, iid))
                    assert taken, "the instance was not taken over while its owner was stopped"
                    time.sleep(1.0)  # the stalled tick goes on and tries its write
        finally:
            feeding.set()
            staller.close()
    try:
        flips = history_flips(engine, iid)
        stalled = [run_at(engine, iid, at) for at in staller.stopped]
        runs = count(engine, "SELECT COUNT(*) FROM sync_runs WHERE instance_id = :i", i=iid)
    finally:
        engine.dispose()
    refused = sum(1 for r in stalled if r is not None and r.error_kind == "lease_lost")
    print(
        f"stalls={len(stalled)} stale_writes_refused={refused} history_flips={flips} "
        f"stalled_ticks={[None if r is None else (r.status, r.error_kind) for r in stalled]} "
        f"runs={runs}"
    )
    assert len(stalled) == STALLS
    assert flips == 0, f"{flips} history rows went back to an older setting"
    # no stalled tick committed its list: each one tried its write and was refused; or,
    # stopped while it still read the answer, failed its fetch on waking up; or, stopped
    # inside its write transaction, had it ended by the database (idle longer than the
    # lease), which let the other replica take the instance over
    assert all(r is not None and r.status == "failed" for r in stalled), stalled
    kinds = {"lease_lost", "timeout", "database"}
    assert all(r.error_kind in kinds for r in stalled if r is not None), stalled
    # most reached their write: the refusal is what is tested
    assert refused >= STALLS // 2, f"only {refused} of {STALLS} stale writes were attempted"

"""Don't hammer a broken instance: growing intervals after failures, counted at the simulator."""

from __future__ import annotations

import pytest

from etl.simulator import Fault
from etl.sync import Syncer, backoff_seconds, register_instances
from tests.conftest import make_instance
from tests.factories import rows


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_ticks(syncer: Syncer, inst, clock: FakeMonotonic, seconds: int, step: int = 60) -> int:  # type: ignore[no-untyped-def]
    """Simulate the daemon's interval job for ``seconds``; return how many syncs ran."""
    ran = 0
    for _ in range(0, seconds, step):
        if syncer.due(inst):
            syncer.sync(inst)
            ran += 1
        clock.t += step
    return ran


def test_policy_doubles_and_caps(sim):
    inst = make_instance(sim, interval_seconds=60)
    assert backoff_seconds(inst, 0, None) is None
    assert [backoff_seconds(inst, n, "unauthorized") for n in range(1, 6)] == [
        120,
        240,
        480,
        900,
        900,
    ]
    # transient: nothing for the first two failures, then the same doubling
    assert [backoff_seconds(inst, n, "server_error") for n in range(1, 7)] == [
        None,
        None,
        120,
        240,
        480,
        900,
    ]
    assert backoff_seconds(inst, 10, "database") is None  # our side: resume at once
    # an interval longer than the cap is never stretched
    assert backoff_seconds(make_instance(sim, interval_seconds=3600), 3, "forbidden") is None
    capped = make_instance(sim, interval_seconds=60, backoff_max_seconds=300)
    assert backoff_seconds(capped, 8, "forbidden") == 300


@pytest.mark.parametrize("status", [401, 403, 404, 466])
def test_permanent_failure_polls_at_growing_intervals(sim, engine, fast_client, status):
    clock = FakeMonotonic()
    syncer = Syncer(engine, fast_client, monotonic=clock)
    inst = make_instance(sim, interval_seconds=60)
    register_instances(engine, [inst])
    sim.set_fault(inst.id_instance, Fault(status=status))
    ran = run_ticks(syncer, inst, clock, 3 * 3600)
    # 0, 120, 360, 840, then every 900 s: 15 polls in 3 hours instead of 180
    assert ran == 15
    assert sim.request_count(inst.id_instance) == 15  # fail fast: one request per poll
    backoffs = [
        r.backoff_seconds for r in rows(engine, "SELECT backoff_seconds FROM sync_runs ORDER BY id")
    ]
    assert backoffs[:5] == [120, 240, 480, 900, 900]
    # first success returns to the normal interval
    sim.set_fault(inst.id_instance, None)
    clock.t += 900
    assert run_ticks(syncer, inst, clock, 600) == 10
    last = rows(engine, "SELECT status, backoff_seconds FROM sync_runs ORDER BY id DESC")[0]
    assert tuple(last) == ("ok", None)


def test_transient_failures_back_off_after_several_ticks(sim, engine, fast_client):
    clock = FakeMonotonic()
    syncer = Syncer(engine, fast_client, monotonic=clock)
    inst = make_instance(sim, interval_seconds=60, max_attempts=2)
    register_instances(engine, [inst])
    sim.set_fault(inst.id_instance, Fault(status=503))
    ran = run_ticks(syncer, inst, clock, 3600)
    # 0, 60, 120 (3rd failure -> 120 s), 240 (-> 240), 480, 960, 1860, 2760: 8 polls
    assert ran == 8
    assert sim.request_count(inst.id_instance) == 2 * ran  # two attempts per poll, bounded
    kinds = {r.error_kind for r in rows(engine, "SELECT error_kind FROM sync_runs")}
    assert kinds == {"server_error"}


def test_backoff_survives_a_restart(sim, engine, fast_client):
    clock = FakeMonotonic()
    inst = make_instance(sim, interval_seconds=60)
    register_instances(engine, [inst])
    sim.set_fault(inst.id_instance, Fault(status=401))
    first = Syncer(engine, fast_client, monotonic=clock)
    for _ in range(3):
        first.sync(inst)
    restarted = Syncer(engine, fast_client, monotonic=clock)
    restarted.restore_backoff([inst])
    assert restarted.consecutive_failures(inst.id_instance) == 3
    assert not restarted.due(inst)
    clock.t += 480
    assert restarted.due(inst)

"""Leases, claims and fencing, in one process against a real database: what the replica
tests (test_fencing, test_fleet_chaos, test_scaleout) show with whole processes, here
piece by piece and fast."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.exc import OperationalError

from etl.client import GreenApiClient
from etl.config import Instance
from etl.db import make_engine
from etl.leases import LeaseManager
from etl.scheduler import Daemon
from etl.simulator import ChangeRates, Fault, Simulator
from etl.sync import Syncer, register_instances
from etl.sync.store import Claim
from etl.sync.store.postgresql import instance_lock_key
from tests.conftest import make_instance, pg_only
from tests.factories import rows, scalar

QUIET = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)
VERSION = "SELECT version FROM instance_sync_state WHERE instance_id = :i"


@pytest.fixture
def fleet_sim() -> Iterator[Simulator]:
    with Simulator(instances=10, chats=5, seed=3, rates=QUIET) as s:
        yield s


def _fleet(sim: Simulator, engine: Engine) -> list[Instance]:
    fleet = [make_instance(sim, iid, interval_seconds=60) for iid in sim.instance_ids]
    register_instances(engine, fleet)
    return fleet


def _settled(engine: Engine, fleet: list[Instance]) -> LeaseManager:
    """A started replica alone on the fleet, two heartbeats on."""
    manager = LeaseManager(engine, fleet)
    manager.start()
    manager.beat()
    manager.beat()
    return manager


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _expire(engine: Engine, manager: LeaseManager) -> None:
    """What ``lease_seconds`` without a heartbeat does: the replica's lease has passed."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE replicas SET lease_until = now() - interval '1 second' "
                "WHERE replica_id = :r"
            ),
            {"r": manager.replica_id},
        )


def test_ids_2_31_apart_have_their_own_lock() -> None:
    """The two-int advisory lock key was ``id % 2**31``: two instances could share it."""
    assert instance_lock_key(1_101_000_001) != instance_lock_key(1_101_000_001 + 2**31)


@pg_only
def test_replicas_claim_their_share_in_batches_and_renew_it_in_one_statement(
    engine: Engine, fleet_sim: Simulator
) -> None:
    fleet = _fleet(fleet_sim, engine)
    a, b = LeaseManager(engine, fleet), LeaseManager(engine, fleet)
    for m in (a, b):
        m.start()
        assert m.beat().gained == []  # the first heartbeat only says it is alive
    gained_a = a.beat().gained  # two replicas alive: a share of 5
    gained_b = b.beat().gained
    assert (len(gained_a), len(gained_b)) == (5, 5)
    assert a.owned.isdisjoint(b.owned) and len(a.owned | b.owned) == 10
    assert all(h.epoch == 1 for h in gained_a + gained_b)  # each claim bumped it once
    # holding its share, a replica's heartbeat is one statement, whatever it holds
    before = sum(a.statements.values())
    for _ in range(5):
        beat = a.beat()
        assert (beat.gained, beat.lost, beat.excess) == ([], [], 0)
    assert sum(a.statements.values()) - before == 5
    owners = dict(rows(engine, "SELECT lease_owner, COUNT(*) FROM instance_sync_state GROUP BY 1"))
    assert owners == {a.replica_id: 5, b.replica_id: 5}


@pg_only
def test_a_dead_replicas_instances_are_taken_over_and_it_learns_so_when_it_wakes(
    engine: Engine, fleet_sim: Simulator
) -> None:
    fleet = _fleet(fleet_sim, engine)
    a, b = LeaseManager(engine, fleet), LeaseManager(engine, fleet)
    for m in (a, b, a, b):
        m.start()
        m.beat()
    taken = set(a.owned)
    _expire(engine, a)  # a stalled past its lease
    assert b.beat().excess == 0
    assert b.owned == {i.id_instance for i in fleet}  # b alone alive: all of them
    epochs = dict(rows(engine, "SELECT instance_id, lease_epoch FROM instance_sync_state"))
    assert all(epochs[i] == 2 for i in taken)  # claimed again: a's claims are stale
    beat = a.beat()  # a wakes: its lease had passed, it reads back what it still owns
    assert sorted(beat.lost) == sorted(taken) and not a.owned


@pg_only
def test_a_stale_ticks_lost_lease_does_not_drop_a_newer_claim(
    engine: Engine, fleet_sim: Simulator
) -> None:
    """A tick made under an old epoch ends as ``lease_lost`` after this replica has claimed
    the instance again (seen through PgBouncer: the stalled replica woke, lost its
    instances, claimed some back, then its stale tick came back refused). Dropping the
    instance then would leave it owned in the database and scheduled nowhere."""
    fleet = _fleet(fleet_sim, engine)
    a = _settled(engine, fleet)
    iid = fleet[0].id_instance
    claim = a.claim(iid)
    assert claim is not None
    assert not a.lost(iid, claim.epoch - 1)  # an older claim's tick: this one stays
    assert iid in a.owned
    assert a.lost(iid, claim.epoch) and iid not in a.owned


@pg_only
def test_no_tick_starts_after_a_heartbeat_that_could_not_reach_the_database(
    engine: Engine, fleet_sim: Simulator
) -> None:
    """The lease is still valid by the clock, but the last heartbeat failed: a tick would
    fetch a list it could not write, so none starts until a heartbeat gets through."""
    fleet = _fleet(fleet_sim, engine)
    a = _settled(engine, fleet)
    iid = fleet[0].id_instance
    assert a.claim(iid) is not None
    with socket.socket() as s:  # a port nothing listens on: the database is away
        s.bind(("127.0.0.1", 0))
        dead = make_url(str(engine.url)).set(port=s.getsockname()[1])
    a.engine = make_engine(dead.render_as_string(hide_password=False))
    with pytest.raises(OperationalError):
        a.beat()
    assert a.unreachable == "OperationalError"
    assert a.claim(iid) is None and iid in a.owned  # still ours, but not ticked
    a.engine.dispose()
    a.engine = engine
    a.beat()
    assert a.unreachable is None and a.claim(iid) is not None


@pytest.mark.parametrize(
    "engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_write_under_a_claim_no_longer_held_writes_nothing_but_its_run(
    engine: Engine, fleet_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """The store refuses the tick (both databases: the fence is in the state bump every
    store shares), records it as ``lease_lost``, and the syncer forgets the instance."""
    inst = _fleet(fleet_sim, engine)[0]
    iid = inst.id_instance
    syncer = Syncer(engine, fast_client)
    assert syncer.sync(inst).status == "ok"  # unfenced: one process
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE instance_sync_state SET lease_owner = 'b', lease_epoch = 7 "
                "WHERE instance_id = :i"
            ),
            {"i": iid},
        )
    fleet_sim.set_chats(iid, [dict(c, name="changed") for c in fleet_sim.chats(iid)])
    chats_before = rows(engine, "SELECT chat_id, name FROM chats ORDER BY chat_id")
    version = scalar(engine, VERSION, i=iid)
    out = syncer.sync(inst, Claim("a", 6))
    assert (out.status, out.error_kind) == ("failed", "lease_lost")
    assert rows(engine, "SELECT chat_id, name FROM chats ORDER BY chat_id") == chats_before
    assert scalar(engine, VERSION, i=iid) == version
    assert scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE error_kind = 'lease_lost'") == 1
    assert iid not in syncer.snapshots  # its memory goes with the lease
    # under the claim that is held, the same list is written
    out = syncer.sync(inst, Claim("b", 7))
    assert out.status == "ok" and out.chats_updated == len(fleet_sim.chats(iid))


@pg_only
def test_a_replica_forgets_what_it_lost(
    engine: Engine, fleet_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """The daemon drops the jobs and the memory of the instances its heartbeat says were
    taken over while it was away."""
    fleet = _fleet(fleet_sim, engine)
    syncer = Syncer(engine, fast_client)
    a = LeaseManager(engine, fleet)
    daemon = Daemon(syncer=syncer, instances=fleet, leases=a)
    a.start()
    daemon._heartbeat()
    daemon._heartbeat()  # claims all 10 (alone), schedules them
    for inst in fleet:
        claim = a.claim(inst.id_instance)
        assert claim is not None
        assert syncer.sync(inst, claim).status == "ok"
    assert all(i.id_instance in syncer.snapshots for i in fleet)
    b = LeaseManager(engine, fleet)
    _expire(engine, a)
    b.start()
    b.beat()
    b.beat()  # takes them all over
    daemon._heartbeat()
    assert not a.owned
    assert [j.id for j in daemon.scheduler.get_jobs() if j.id.startswith("sync-")] == []
    assert not any(i.id_instance in syncer.snapshots for i in fleet)


@pg_only
def test_instances_handed_back_come_with_their_snapshots(
    engine: Engine, fleet_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """A replica above its fair share hands instances back; their snapshots go into the
    table first, so that the replica that claims them syncs them at a steady tick's cost,
    not a rebuild from every chat row."""
    fleet = _fleet(fleet_sim, engine)
    syncer = Syncer(engine, fast_client)  # the default mode: no snapshot written by a tick
    a = LeaseManager(engine, fleet)
    daemon = Daemon(syncer=syncer, instances=fleet, leases=a)
    a.start()
    daemon._heartbeat()
    daemon._heartbeat()  # alone: claims all 10
    daemon.scheduler.start(paused=True)  # its jobs get their times, and none runs
    try:
        for inst in fleet:
            claim = a.claim(inst.id_instance)
            assert claim is not None and syncer.sync(inst, claim).status == "ok"
        assert scalar(engine, "SELECT COUNT(*) FROM instance_snapshots") == 0
        b = LeaseManager(engine, fleet)
        b.start()
        b.beat()  # alive: a's share is 5 now
        daemon._heartbeat()  # hands 5 back
    finally:
        daemon.scheduler.shutdown(wait=False)
    handed = {i.id_instance for i in fleet} - a.owned
    assert len(handed) == 5
    left = dict(
        rows(
            engine,
            "SELECT s.instance_id, s.version = st.version FROM instance_snapshots s "
            "JOIN instance_sync_state st USING (instance_id)",
        )
    )
    assert left == dict.fromkeys(handed, True)  # each at its state's version
    assert not any(iid in syncer.snapshots for iid in handed)  # and forgotten here
    claimed = {h.instance_id for h in b.beat().gained}
    gained = [i for i in fleet if i.id_instance in claimed]
    assert {i.id_instance for i in gained} == handed
    assert Syncer(engine, fast_client).preload(gained) == 5


@pg_only
def test_backoff_is_the_instances_not_the_replicas(
    engine: Engine, fleet_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """A replica that takes an instance over resumes its backoff from its state row."""
    inst = _fleet(fleet_sim, engine)[0]
    fleet_sim.set_fault(inst.id_instance, Fault(status=401))
    clock = Clock()
    first = Syncer(engine, fast_client, monotonic=clock)
    for _ in range(3):
        first.sync(inst)
    state = rows(
        engine,
        "SELECT failures, failure_kind, next_due_at > now() AS later FROM instance_sync_state "
        "WHERE instance_id = :i",
        i=inst.id_instance,
    )[0]
    assert (state.failures, state.failure_kind, state.later) == (3, "unauthorized", True)
    other = Syncer(engine, fast_client, monotonic=clock)
    other.restore_backoff([inst])
    assert other.consecutive_failures(inst.id_instance) == 3 and not other.due(inst)

"""The persisted snapshot (``instance_snapshots``): a new process reads one value per
instance instead of every chat row, and skips the unchanged elements of its first list; it
is an optimisation only. Missing, stale (another writer moved the instance on) or corrupt,
the sync falls back to reading the rows and is just as correct. Both databases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from etl.client import GreenApiClient
from etl.clock import utcnow
from etl.db import make_engine
from etl.ids import link_ids
from etl.scheduler import Daemon
from etl.simulator import ChangeRates, Simulator
from etl.sync import Syncer, register_instances
from etl.sync.fingerprints import fingerprint
from etl.sync.identity import Identity
from etl.sync.snapshot import PackedSnapshot, Snapshot, SnapshotCache
from etl.sync.store import pg_sql
from tests.conftest import make_instance
from tests.factories import check_history_invariants, rows, scalar
from tests.replicas import wait_for

RATES = ChangeRates(new=0.02, rename=0.02, archive=0.01, ephemeral=0.03, removal=0.02)


@pytest.fixture
def busy_sim() -> Iterator[Simulator]:
    with Simulator(instances=2, chats=60, seed=31, rates=RATES) as s:
        yield s


class Reads:
    """Counts, per statement kind, what a syncer asks of ``chats``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.full: list[str] = []
        #: reads of the rows written since a stale snapshot's floor (a top-up)
        self.since: list[str] = []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        flat = " ".join(statement.split()).lower()
        # a snapshot rebuilt from the table: every chat of the instance, by instance only
        by_instance = "where chats.instance_id =" in flat or "where instance_id =" in flat
        some = "chat_id in" in flat or "any(" in flat
        since = "change_seq >=" in flat
        if "from chats" in flat and by_instance and not some and not since:
            self.full.append(flat[:80])
        if "chats" in flat and since:
            self.since.append(flat[:80])

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def _state(engine: Engine, iid: int) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in rows(
            engine,
            "SELECT chat_id, chat_type, name, archived, ephemeral_expiration, "
            "ephemeral_setting_at, removed_at IS NULL FROM chats WHERE instance_id = :i "
            "ORDER BY chat_id",
            i=iid,
        )
    ]


def _history(engine: Engine, iid: int) -> int:
    return int(
        scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history WHERE instance_id = :i", i=iid)
    )


def test_a_fresh_process_reads_the_persisted_snapshot_not_the_rows(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient
) -> None:
    inst = make_instance(busy_sim)
    register_instances(engine, [inst])
    assert Syncer(engine, fast_client, persist_snapshots=True).sync(inst).status == "ok"
    stored = scalar(
        engine, "SELECT COUNT(*) FROM instance_snapshots WHERE instance_id = :i", i=inst.id_instance
    )
    assert stored == 1
    for _ in range(3):
        busy_sim.step()
        reads = Reads(engine)
        try:
            fresh = Syncer(
                engine, fast_client, persist_snapshots=True
            )  # a new process: nothing cached
            assert fresh.preload([inst]) == 1
            out = fresh.sync(inst)
        finally:
            reads.close()
        assert out.status == "ok", out
        assert reads.full == [], reads.full  # no chat row read to rebuild a snapshot
    # the same list again, in a new process: nothing written but the run and the state
    history = _history(engine, inst.id_instance)
    before = _state(engine, inst.id_instance)
    out = Syncer(engine, fast_client, persist_snapshots=True).sync(inst)
    assert (out.chats_inserted, out.chats_updated, out.chats_removed) == (0, 0, 0)
    assert _state(engine, inst.id_instance) == before
    assert _history(engine, inst.id_instance) == history
    check_history_invariants(engine)


@pytest.mark.parametrize("compact", [False, True])
def test_the_daemon_keeps_snapshots_as_dicts_or_packed_and_persists_only_packed_ones(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient, compact: bool
) -> None:
    """A daemon's syncer by default keeps its snapshots as dicts and writes none (a steady
    tick converts nothing); with ``compact_snapshots`` it keeps them packed and writes
    each tick's, so that a replica taking the instance over starts from it. The data is
    the same either way."""
    inst = make_instance(busy_sim)
    register_instances(engine, [inst])
    syncer = Syncer(engine, fast_client, compact_snapshots=compact)
    for _ in range(4):
        assert syncer.sync(inst).status == "ok"
        busy_sim.step()
    stored = scalar(engine, "SELECT COUNT(*) FROM instance_snapshots")
    assert stored == (1 if compact else 0)
    assert (syncer.snapshots.packed_bytes() > 0) is compact
    live = syncer.snapshots.get(inst.id_instance)
    present = {r[0] for r in _state(engine, inst.id_instance) if r[-1]}
    assert live is not None and live.present() == present
    check_history_invariants(engine)


#: damage after which the rows are read: every chat row, or those written since the floor
READS_AFTER = {
    "missing": "full",
    "stale": "since",
    "stale-without-floor": "full",
    "corrupt": "full",
    "other-decoder": "since",
}


@pytest.mark.parametrize("damage", list(READS_AFTER))
def test_a_snapshot_that_cannot_be_used_falls_back_to_the_rows(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient, damage: str
) -> None:
    """Two instances get the same lists: one synced by a single syncer all along (the
    reference), the other by a new syncer every tick whose persisted snapshot has been
    damaged first. The stored chats and history end the same. A stale snapshot with a
    floor is topped up from the rows written since (a stale one from before revision
    0011 has none: every row is read)."""
    ref_id, test_id = busy_sim.instance_ids
    ref, inst = make_instance(busy_sim, ref_id), make_instance(busy_sim, test_id)
    register_instances(engine, [ref, inst])
    warm = Syncer(engine, fast_client, persist_snapshots=True)
    for step in range(5):
        listed = busy_sim.chats(ref_id)
        before = None
        if step and damage.startswith("stale"):
            # another writer syncs a renamed list and leaves the snapshot as it was, as a
            # writer that knows nothing of snapshots would: the state's version moves on
            before = _snapshot_row(engine, test_id)
            renamed = [dict(c, name=f"{c['name']} *") if c.get("name") else c for c in listed]
            busy_sim.set_chats(test_id, renamed)
            assert Syncer(engine, fast_client, persist_snapshots=True).sync(inst).chats_updated > 0
        busy_sim.set_chats(test_id, listed)
        assert warm.sync(ref).status == "ok"
        if step:
            _damage(engine, test_id, damage, before)
        reads = Reads(engine)
        try:
            out = Syncer(engine, fast_client, persist_snapshots=True).sync(inst)
        finally:
            reads.close()
        assert out.status == "ok", out
        if step and READS_AFTER[damage] == "full":
            assert reads.full, "the damaged snapshot was used instead of the rows"
        elif step:
            assert reads.full == [], "a stale snapshot was not topped up"
            assert reads.since, "a stale snapshot was used without the rows written since"
        assert _state(engine, test_id) == _state(engine, ref_id)
        assert _history(engine, test_id) == _history(engine, ref_id)
        busy_sim.step()
    check_history_invariants(engine)


def _snapshot_row(engine: Engine, iid: int) -> tuple[bytes, int, int | None]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT data, version, change_seq_floor FROM instance_snapshots "
                "WHERE instance_id = :i"
            ),
            {"i": iid},
        ).one()
    return bytes(row.data), int(row.version), row.change_seq_floor


def _damage(engine: Engine, iid: int, how: str, before: Any = None) -> None:
    with engine.begin() as conn:
        if how == "missing":
            conn.execute(text("DELETE FROM instance_snapshots WHERE instance_id = :i"), {"i": iid})
        elif how.startswith("stale"):  # another writer moved the instance on without it
            conn.execute(
                text(
                    "UPDATE instance_snapshots SET data = :d, version = :v, "
                    "change_seq_floor = :f WHERE instance_id = :i"
                ),
                {"d": before[0], "v": before[1], "f": before[2], "i": iid},
            )
            if how == "stale-without-floor":  # as written before revision 0011
                conn.execute(
                    text(
                        "UPDATE instance_snapshots SET change_seq_floor = NULL "
                        "WHERE instance_id = :i"
                    ),
                    {"i": iid},
                )
        elif how == "corrupt":
            data = conn.execute(
                text("SELECT data FROM instance_snapshots WHERE instance_id = :i"), {"i": iid}
            ).scalar_one()
            broken = bytes(data[: len(data) // 2]) + b"\x00garbage"
            conn.execute(
                text("UPDATE instance_snapshots SET data = :d WHERE instance_id = :i"),
                {"d": broken, "i": iid},
            )
        elif how == "other-decoder":  # a snapshot an older release's decoder judged
            data = conn.execute(
                text("SELECT data FROM instance_snapshots WHERE instance_id = :i"), {"i": iid}
            ).scalar_one()
            packed = PackedSnapshot.from_bytes(bytes(data))
            packed.tag = "whatsapp/0"
            # the element hashes say nothing for this decoder; the fingerprints still hold
            # (the version moved on, but no row was written since): the elements are all
            # parsed again
            conn.execute(
                text("UPDATE instance_snapshots SET data = :d WHERE instance_id = :i"),
                {"d": packed.to_bytes(), "i": iid},
            )
            conn.execute(
                text("UPDATE instance_sync_state SET version = version + 1 WHERE instance_id = :i"),
                {"i": iid},
            )


@pytest.mark.parametrize("floor", [True, False])
def test_an_operator_link_reaches_the_next_process(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient, floor: bool
) -> None:
    """``etl ids link`` bumps the state version without rewriting the snapshot: a process
    started afterwards must not trust the snapshot as it is (it knows nothing of the new
    alias). With a floor it tops it up with the alias (numbered like a tick's rows);
    without one (from before revision 0011) it does not use it."""
    inst = make_instance(busy_sim)
    register_instances(engine, [inst])
    assert Syncer(engine, fast_client, persist_snapshots=True).sync(inst).status == "ok"
    if not floor:
        with engine.begin() as conn:
            conn.execute(text("UPDATE instance_snapshots SET change_seq_floor = NULL"))
    chat = busy_sim.chats(inst.id_instance)[0]["id"]
    assert isinstance(chat, str)
    assert link_ids(engine, inst.id_instance, [(chat, "999@lid")], now=utcnow()).linked == 1
    fresh = Syncer(engine, fast_client, persist_snapshots=True)
    assert fresh.preload([inst]) == (1 if floor else 0)
    if floor:
        kept = fresh.snapshots.get(inst.id_instance)
        assert kept is not None and kept.identity.aliases == {"999@lid": chat}
        assert kept.version == scalar(engine, "SELECT version FROM instance_sync_state")


@pytest.mark.parametrize("persist_on_release", [True, False])
def test_a_stopping_daemon_leaves_its_snapshots_for_the_next_process(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient, persist_on_release: bool
) -> None:
    """A daemon in the default mode writes no snapshot while it runs. Stopping, it writes
    each instance's (``persist_on_release``), so that the next process (a restart, a
    deploy) starts from them instead of every chat row; what it wrote is what the rows
    say."""
    fleet = [make_instance(busy_sim, iid, interval_seconds=1) for iid in busy_sim.instance_ids]
    register_instances(engine, fleet)
    daemon = Daemon(
        syncer=Syncer(engine, fast_client),
        instances=fleet,
        max_workers=2,
        persist_on_release=persist_on_release,
    )
    synced = "SELECT COUNT(DISTINCT instance_id) FROM sync_runs WHERE status = 'ok'"
    daemon.start()
    try:
        # the timeout only stops a hang: a loaded machine is slow, not wrong
        assert wait_for(lambda: scalar(engine, synced) >= len(fleet), 30), "no sync of each"
        assert scalar(engine, "SELECT COUNT(*) FROM instance_snapshots") == 0
    finally:
        assert daemon.stop()
    stored = scalar(engine, "SELECT COUNT(*) FROM instance_snapshots")
    assert stored == (len(fleet) if persist_on_release else 0)
    if not persist_on_release:
        return
    fresh = Syncer(engine, fast_client)  # the next process
    assert fresh.preload(fleet) == len(fleet)  # each at its state's version
    with engine.connect() as conn:
        for inst in fleet:
            kept = fresh.snapshots.get(inst.id_instance)
            rebuilt = fresh.store.load_stored(conn, inst.id_instance)
            assert kept is not None
            assert (kept.fingerprints, kept.removed, kept.identity) == (
                rebuilt.fingerprints,
                rebuilt.removed,
                rebuilt.identity,
            )
    busy_sim.step()
    reads = Reads(engine)
    try:
        outs = [fresh.sync(inst) for inst in fleet]
    finally:
        reads.close()
    assert all(o.status == "ok" for o in outs), outs
    assert reads.full == [], reads.full
    check_history_invariants(engine)


def test_a_snapshot_left_behind_never_replaces_a_newer_one(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """A process that lets an instance go after another has moved it on (and written its
    own snapshot) leaves the newer snapshot as it is; its own would be stale."""
    inst = make_instance(busy_sim)
    register_instances(engine, [inst])
    old = Syncer(engine, fast_client)
    assert old.sync(inst).status == "ok"
    busy_sim.step()
    assert Syncer(engine, fast_client, persist_snapshots=True).sync(inst).chats_updated > 0
    newer = _snapshot_row(engine, inst.id_instance)
    assert old.persist_held() == 1
    assert _snapshot_row(engine, inst.id_instance) == newer
    assert old.persist_held() == 0  # sent once
    assert Syncer(engine, fast_client).preload([inst]) == 1


def test_packed_snapshots_round_trip_and_refuse_garbage() -> None:
    cache = SnapshotCache(compact=True)

    packed = PackedSnapshot.pack(
        {"1@c.us": 11, "2@c.us": -22, "3@g.us": 33},
        {"2@c.us"},
        {101: "1@c.us", 303: "3@g.us", 404: "9@lid"},
        555,
        "whatsapp/1",
        Identity({"9@lid": "1@c.us"}, {"1@c.us": "9@lid"}),
    )
    again = PackedSnapshot.from_bytes(packed.to_bytes())
    snap = again.unpack(7, persisted=True)
    assert snap.fingerprints == {"1@c.us": 11, "2@c.us": -22, "3@g.us": 33}
    assert snap.removed == {"2@c.us"}
    assert snap.raw == {101: "1@c.us", 303: "3@g.us", 404: "9@lid"}
    assert (snap.body_hash, snap.tag, snap.version, snap.persisted) == (555, "whatsapp/1", 7, True)
    assert snap.identity.aliases == {"9@lid": "1@c.us"}
    assert snap.identity.current == {"1@c.us": "9@lid"}
    data = packed.to_bytes()
    for broken in (b"", b"nope", data[:-1], data + b"x", b"CSS1" + data[4:20]):
        with pytest.raises(ValueError):
            PackedSnapshot.from_bytes(broken)
    cache.keep_after(1, snap, packed, 3, persisted=True)
    assert cache.get_current(1, 5) is None  # another writer wrote version 4
    assert cache.get_current(1, 4) is cache.get(1)  # unpacked once per tick
    cache.settle(1)
    assert cache.get(1) is not None


def test_snapshots_some_ticks_old_are_topped_up_from_the_rows_written_since(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """A daemon in the default mode writes each instance's snapshot every few ticks
    (``persist_every``), and dies without writing the rest. The process that takes its
    instances over reads those snapshots, some ticks old, and only the rows written since
    (renames, removals, new chats, an id switch to @lid); what it starts from is what a
    rebuild from every row gives, and it syncs on from there without reading every row."""
    fleet = [make_instance(busy_sim, iid) for iid in busy_sim.instance_ids]
    register_instances(engine, fleet)
    dying = Syncer(engine, fast_client, persist_every=3)
    for tick in range(7):
        if tick == 4:
            busy_sim.set_lid_mode(fleet[0].id_instance)
        for inst in fleet:
            assert dying.sync(inst).status == "ok"
        busy_sim.step()
    behind = scalar(
        engine,
        "SELECT COUNT(*) FROM instance_snapshots s JOIN instance_sync_state t "
        "ON t.instance_id = s.instance_id WHERE s.version < t.version",
    )
    assert scalar(engine, "SELECT COUNT(*) FROM instance_snapshots") == len(fleet)
    assert behind >= 1  # one tick in 3 persists, the instances in turn: one at least
    assert scalar(engine, "SELECT COUNT(*) FROM chat_aliases") > 0  # the switch happened

    reads = Reads(engine)
    try:
        heir = Syncer(engine, fast_client)  # a new process: nothing cached, nothing handed
        assert heir.preload(fleet) == len(fleet)
        assert reads.full == [] and reads.since
        store = heir.store
        for inst in fleet:
            kept = heir.snapshots.get(inst.id_instance)
            with engine.connect() as conn:
                rebuilt = store.load_stored(conn, inst.id_instance)
                version = store.state_version(conn, inst.id_instance)
            assert kept is not None and kept.version == version
            assert kept.fingerprints == rebuilt.fingerprints
            assert kept.removed == rebuilt.removed
            assert kept.identity == rebuilt.identity
        reads.full.clear()
        for _ in range(2):
            for inst in fleet:
                out = heir.sync(inst)
                assert out.status == "ok", out
            busy_sim.step()
        assert reads.full == []
    finally:
        reads.close()
    check_history_invariants(engine)


def test_a_top_up_applies_every_row_and_forgets_the_elements_of_the_chats_they_name() -> None:
    """Pure logic of ``Snapshot.topped_up``: each chat row written since replaces the
    chat's fingerprint, removal and id in use; each alias row is added; an element of the
    last list is no longer skipped as unchanged once a row names its chat (under its own
    id or an alias, before or after), and the whole body's hash is forgotten."""
    now = utcnow()
    snap = Snapshot(
        version=3,
        fingerprints={"a": 1, "b": 2, "c": 3, "e": 5},
        removed={"c"},
        raw={11: "a", 12: "b", 13: "x@lid", 14: "c", 15: "e", 16: "z@lid"},
        body_hash=99,
        tag="whatsapp/1",
        identity=Identity({"x@lid": "b", "z@lid": "e"}, {"b": "x@lid"}),
    )
    rows = [
        ("a", "user", "Ann", False, 0, None, None, None),  # renamed
        ("b", "user", "Bob", False, 0, None, None, None),  # back to its own id
        ("c", "user", "Cy", False, 86400, now, None, "w@lid"),  # back, with a new id
        ("d", "group", "D", True, 0, None, now, None),  # new, and removed already
    ]
    out = snap.topped_up(5, rows, [("w@lid", "c"), ("y@lid", "a")])
    assert out.version == 5 and out.body_hash == 0 and out.tag == snap.tag
    assert out.fingerprints == {
        "a": fingerprint("user", "Ann", False, 0, None),
        "b": fingerprint("user", "Bob", False, 0, None),
        "c": fingerprint("user", "Cy", False, 86400, now),
        "d": fingerprint("group", "D", True, 0, None),
        "e": 5,
    }
    assert out.removed == {"d"}
    assert out.identity == Identity(
        {"x@lid": "b", "z@lid": "e", "w@lid": "c", "y@lid": "a"}, {"c": "w@lid"}
    )
    assert out.raw == {15: "e", 16: "z@lid"}  # only the chat no row names
    assert (snap.fingerprints["a"], snap.removed, snap.raw[11]) == (1, {"c"}, "a")  # unchanged
    assert snap.topped_up(4, [], []).raw == snap.raw  # nothing written since: all kept


def test_a_turn_to_persist_at_a_tick_that_changed_nothing_passes_to_the_next_that_does(
    engine: Engine, busy_sim: Simulator, fast_client: GreenApiClient
) -> None:
    """With ``persist_every``, a tick that changed nothing writes no snapshot even on its
    turn (the one in the table is no further behind in rows); the next tick that changes
    something writes it."""
    inst = make_instance(busy_sim)
    register_instances(engine, [inst])
    every = 3
    syncer = Syncer(engine, fast_client, persist_every=every)
    snapshot_version = "SELECT version FROM instance_snapshots"
    assert syncer.sync(inst).chats_inserted > 0
    assert scalar(engine, snapshot_version) == 1  # the first load writes it

    def turn(version: int) -> bool:
        return (version + inst.id_instance) % every == 0

    version, turns = 1, 0
    # the same list until a turn has passed and the next tick's version is not a turn
    while not turns or turn(version + 1):
        out = syncer.sync(inst)
        assert out.status == "ok" and out.chats_updated == out.chats_inserted == 0
        version += 1
        turns += turn(version)
    assert scalar(engine, snapshot_version) == 1  # a turn came, nothing was written
    busy_sim.step()
    out = syncer.sync(inst)
    assert out.chats_updated + out.chats_inserted + out.chats_removed > 0
    assert scalar(engine, snapshot_version) == version + 1  # not its turn: the owed one
    assert scalar(engine, "SELECT version FROM instance_sync_state") == version + 1


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _plan_nodes(child)


@pytest.mark.postgres
@pytest.mark.parametrize("sql", ["CHATS_SINCE", "ALIASES_SINCE"])
def test_the_top_up_read_does_not_scan_the_whole_table(pg_db: str, sql: str) -> None:
    """The top-up read, one statement per 500 instances, goes through the
    ``(instance_id, change_seq)`` index (revision 0012). Without it PostgreSQL chose a
    sequential scan of the whole table for every chunk: a takeover that grew with the
    square of the fleet (docs/benchmarks.md, "The top-up read at scale")."""
    engine = make_engine(pg_db)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO instances (id_instance, label, api_url, enabled, created_at,"
                " updated_at) SELECT i, '', 'http://127.0.0.1:9', true, now(), now()"
                " FROM generate_series(1, 400) i"
            )
            conn.exec_driver_sql(
                "INSERT INTO chats (instance_id, chat_id, chat_type, name, archived,"
                " ephemeral_expiration, first_seen_at, updated_at)"
                " SELECT i, c || '@c.us', 'user', 'n', false, 0, now(), now()"
                " FROM generate_series(1, 400) i, generate_series(1, 250) c"
            )
            conn.exec_driver_sql(
                "INSERT INTO chat_aliases (instance_id, alias_id, chat_id, source, linked_at)"
                " SELECT instance_id, chat_id || 'x', chat_id, 'operator', now() FROM chats"
            )
            conn.exec_driver_sql("ANALYZE chats")
            conn.exec_driver_sql("ANALYZE chat_aliases")
        with engine.connect() as conn:
            floor = conn.execute(text("SELECT watermark FROM load_watermark")).scalar_one()
            params = {"ids": list(range(1, 401)), "floors": [floor] * 400}
            explained = conn.exec_driver_sql(
                "EXPLAIN (FORMAT JSON) " + getattr(pg_sql, sql), params
            ).scalar_one()
    finally:
        engine.dispose()
    nodes = list(_plan_nodes(explained[0]["Plan"]))
    table = "chats" if sql == "CHATS_SINCE" else "chat_aliases"
    scans = [n["Node Type"] for n in nodes if n.get("Relation Name") == table]
    assert scans and "Seq Scan" not in scans, nodes

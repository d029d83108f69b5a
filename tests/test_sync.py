"""Sync semantics against a real database (SQLite and PostgreSQL) and the simulator over HTTP."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, event, select, text

from etl.client import GreenApiClient
from etl.models import Chat, ChatEphemeralHistory
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, choose_valid_from, register_instances
from etl.sync.store.postgresql import instance_lock_key
from tests.conftest import make_instance
from tests.factories import (
    SEED_EXAMPLE,
    chat,
    chat_row,
    chats_list,
    check_history_invariants,
    history,
    rows,
    scalar,
    table_counts,
)
from tests.test_bi import as_utc


class Clock:
    """A controllable UTC clock for the syncer."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 60) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def csyncer(engine: Engine, fast_client: GreenApiClient, clock: Clock) -> Syncer:
    return Syncer(engine, fast_client, clock=clock)


@pytest.fixture
def inst(sim: Simulator, engine: Engine):  # type: ignore[no-untyped-def]
    instance = make_instance(sim)
    register_instances(engine, [instance])
    return instance


def ts(dt: datetime) -> int:
    return int(dt.timestamp())


def test_seed_example_loads_exactly(sim, engine, csyncer, inst, clock):
    sim.set_chats(inst.id_instance, SEED_EXAMPLE)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_received, out.chats_inserted) == ("ok", 3, 3)
    assert (out.chats_updated, out.chats_removed, out.chats_rejected) == (0, 0, 0)
    with engine.connect() as conn:
        got = {
            c.chat_id: c
            for c in conn.execute(select(Chat).where(Chat.instance_id == inst.id_instance))
        }
    assert set(got) == {"79876543210@c.us", "79001234567@c.us", "79001234567-1479621234@g.us"}
    john = got["79876543210@c.us"]
    assert (john.name, john.chat_type, john.archived) == ("John Doe", "user", False)
    assert john.ephemeral_expiration == 86400
    assert john.ephemeral_setting_at == datetime.fromtimestamp(1777870423, UTC)
    assert john.ephemeral_setting_at.tzinfo is not None
    assert john.first_seen_at == clock.now and john.removed_at is None
    group = got["79001234567-1479621234@g.us"]
    assert (group.name, group.chat_type, group.ephemeral_expiration) == ("My Group", "group", 0)
    assert group.ephemeral_setting_at is None
    # First history row: valid_from is the API's (plausible, past) timestamp for John,
    # the observation time for the never-set chats.
    with engine.connect() as conn:
        hist = {h.chat_id: h for h in conn.execute(select(ChatEphemeralHistory))}
    assert hist["79876543210@c.us"].valid_from == datetime.fromtimestamp(1777870423, UTC)
    assert hist["79001234567@c.us"].valid_from == clock.now
    assert all(h.valid_to is None and h.sync_run_id == out.sync_run_id for h in hist.values())
    check_history_invariants(engine)
    run = rows(engine, "SELECT * FROM sync_runs")[0]
    assert (run.status, run.http_status, run.attempts, run.chats_inserted) == ("ok", 200, 1, 3)


def test_first_load_rows_match_the_rules(sim, engine, csyncer, inst, clock):
    """An instance's first load (on PostgreSQL one statement that derives the history and
    event rows in SQL, ``_pg_write_first_load``) follows the same rules as any later tick:
    ``choose_valid_from`` at every edge of the skew allowance, unknown settings stored as
    off, one ``created`` event per chat, a malformed element rejected alone."""
    now, iid = clock.now, inst.id_instance
    skew = timedelta(minutes=5)
    unknown = chat("5@c.us", name="No setting")
    del unknown["ephemeralExpiration"], unknown["ephemeralSettingTimestamp"]
    stamps = {
        "1@c.us": now - timedelta(days=10),
        "2@c.us": now + timedelta(minutes=4),
        "3@c.us": now + skew,
        "4@c.us": now + skew + timedelta(seconds=1),
    }

    def odd_name(cid: str) -> str:
        return 'N "' + cid + '" },{'

    stamps_items = list(stamps.items())
    listed = [
        *(
            chat(cid, name=odd_name(cid), expiration=86400, stamp=ts(at))
            for cid, at in stamps_items
        ),
        chat("6@c.us", name="Never set"),
        unknown,
        {"name": "no id", "type": "user"},
        chat("79001234567-1479621234@g.us", kind="group", name="Группа 🙂", archive=True),
    ]
    sim.set_chats(iid, listed)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_received, out.chats_inserted, out.chats_rejected) == (
        "ok",
        8,
        7,
        1,
    )
    got = {r.chat_id: r for r in rows(engine, "SELECT * FROM chats WHERE instance_id = :i", i=iid)}
    hist = {
        r.chat_id: r
        for r in rows(engine, "SELECT * FROM chat_ephemeral_history WHERE instance_id = :i", i=iid)
    }
    assert set(got) == set(hist) == {*stamps, "5@c.us", "6@c.us", "79001234567-1479621234@g.us"}
    for cid, at in stamps.items():
        assert got[cid].name == odd_name(cid)
        assert (got[cid].ephemeral_expiration, as_utc(got[cid].ephemeral_setting_at)) == (
            86400,
            at,
        )
        h = hist[cid]
        assert (h.ephemeral_expiration, as_utc(h.ephemeral_setting_at)) == (86400, at)
        assert as_utc(h.valid_from) == choose_valid_from(at, None, now), cid
    assert as_utc(hist["3@c.us"].valid_from) == now + skew  # the edge is trusted
    assert as_utc(hist["4@c.us"].valid_from) == now  # one second beyond is not
    for cid in ("5@c.us", "6@c.us", "79001234567-1479621234@g.us"):
        assert (got[cid].ephemeral_expiration, got[cid].ephemeral_setting_at) == (0, None)
        assert (hist[cid].ephemeral_expiration, hist[cid].ephemeral_setting_at) == (0, None)
        assert as_utc(hist[cid].valid_from) == now
    group = got["79001234567-1479621234@g.us"]
    assert (group.chat_type, group.name, bool(group.archived)) == ("group", "Группа 🙂", True)
    assert all(
        as_utc(r.first_seen_at) == as_utc(r.updated_at) == now and r.removed_at is None
        for r in got.values()
    )
    assert all(h.valid_to is None and h.sync_run_id == out.sync_run_id for h in hist.values())
    events = rows(
        engine,
        "SELECT chat_id, event_type, old_value, new_value, occurred_at, sync_run_id "
        "FROM chat_events WHERE instance_id = :i",
        i=iid,
    )
    assert sorted((e[0], e[1], e[2], e[3], as_utc(e[4]), e[5]) for e in events) == sorted(
        (cid, "created", None, r.name, now, out.sync_run_id) for cid, r in got.items()
    )
    run = rows(engine, "SELECT * FROM sync_runs WHERE id = :r", r=out.sync_run_id)[0]
    assert (run.status, run.chats_received, run.chats_inserted, run.chats_rejected) == (
        "ok",
        8,
        7,
        1,
    )
    check_history_invariants(engine)
    # the next tick diffs against what the first load stored: nothing changed
    clock.advance(60)
    again = csyncer.sync(inst)
    assert (again.chats_inserted, again.chats_updated, again.ephemeral_changes) == (0, 0, 0)
    assert scalar(engine, "SELECT COUNT(*) FROM chat_events") == 7


def test_ephemeral_change_closes_and_opens_history(sim, engine, csyncer, inst, clock):
    sim.set_chats(inst.id_instance, [chat("1@c.us"), chat("2@c.us")])
    csyncer.sync(inst)
    # turned on, with the API's timestamp 30 s before we look
    changed_at = clock.advance(60) - timedelta(seconds=30)
    sim.set_chats(
        inst.id_instance,
        [chat("1@c.us", expiration=604800, stamp=ts(changed_at)), chat("2@c.us")],
    )
    out = csyncer.sync(inst)
    assert (out.status, out.chats_updated, out.ephemeral_changes) == ("ok", 1, 1)
    h = history(engine, inst.id_instance, "1@c.us")
    assert len(h) == 2
    assert h[1].ephemeral_expiration == 604800 and h[1].valid_to is None
    check_history_invariants(engine)
    with engine.connect() as conn:
        hs = list(
            conn.execute(
                select(ChatEphemeralHistory)
                .where(ChatEphemeralHistory.chat_id == "1@c.us")
                .order_by(ChatEphemeralHistory.valid_from)
            )
        )
    assert hs[1].valid_from == changed_at == hs[0].valid_to
    # turned off again: timestamp 0 -> observed time; then re-set to the same value
    off_at = clock.advance(60)
    sim.set_chats(inst.id_instance, [chat("1@c.us"), chat("2@c.us")])
    assert csyncer.sync(inst).ephemeral_changes == 1
    clock.advance(60)
    sim.set_chats(
        inst.id_instance, [chat("1@c.us", expiration=0, stamp=ts(clock.now)), chat("2@c.us")]
    )
    assert csyncer.sync(inst).ephemeral_changes == 1  # same value, new setting event
    h = history(engine, inst.id_instance, "1@c.us")
    assert [r.ephemeral_expiration for r in h] == [0, 604800, 0, 0]
    with engine.connect() as conn:
        last_two = list(
            conn.execute(
                select(ChatEphemeralHistory.valid_from)
                .where(ChatEphemeralHistory.chat_id == "1@c.us")
                .order_by(ChatEphemeralHistory.valid_from)
            ).scalars()
        )[-2:]
    assert last_two[0] == off_at
    check_history_invariants(engine)
    assert scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history WHERE valid_to IS NULL") == 2


def test_implausible_timestamps_fall_back_to_observation(sim, engine, csyncer, inst, clock):
    first_at = clock.now - timedelta(days=30)
    sim.set_chats(inst.id_instance, [chat("1@c.us", expiration=86400, stamp=ts(first_at))])
    csyncer.sync(inst)
    # a timestamp before the open row's valid_from: not plausible
    clock.advance(60)
    sim.set_chats(
        inst.id_instance,
        [chat("1@c.us", expiration=604800, stamp=ts(first_at - timedelta(days=1)))],
    )
    csyncer.sync(inst)
    # a timestamp 10 minutes in the future: beyond the 5-minute skew allowance
    clock.advance(60)
    sim.set_chats(
        inst.id_instance,
        [chat("1@c.us", expiration=86400, stamp=ts(clock.now + timedelta(minutes=10)))],
    )
    csyncer.sync(inst)
    with engine.connect() as conn:
        starts = list(
            conn.execute(
                select(ChatEphemeralHistory.valid_from).order_by(ChatEphemeralHistory.valid_from)
            ).scalars()
        )
    assert starts == [first_at, clock.now - timedelta(seconds=60), clock.now]
    check_history_invariants(engine)


def test_choose_valid_from_rules():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    prev = now - timedelta(hours=1)
    assert choose_valid_from(now - timedelta(minutes=5), prev, now) == now - timedelta(minutes=5)
    assert choose_valid_from(now + timedelta(minutes=4), prev, now) == now + timedelta(minutes=4)
    assert choose_valid_from(now + timedelta(minutes=6), prev, now) == now
    assert choose_valid_from(prev, prev, now) == now
    assert choose_valid_from(None, None, now) == now
    # observed time not after the previous start (future-dated previous row): nudged past it
    future_prev = now + timedelta(minutes=2)
    assert choose_valid_from(None, future_prev, now) > future_prev


def test_unchanged_tick_writes_nothing(sim, engine, csyncer, inst, clock):
    first = csyncer.sync(inst)
    assert first.chats_inserted == 30
    before = table_counts(engine)
    updated = rows(engine, "SELECT chat_id, updated_at FROM chats ORDER BY chat_id")
    clock.advance(60)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_inserted, out.chats_updated) == ("ok", 0, 0)
    assert (out.chats_removed, out.ephemeral_changes) == (0, 0)
    after = table_counts(engine)
    assert after["chats"] == before["chats"]
    assert after["chat_ephemeral_history"] == before["chat_ephemeral_history"]
    assert after["sync_runs"] == before["sync_runs"] + 1
    assert rows(engine, "SELECT chat_id, updated_at FROM chats ORDER BY chat_id") == updated


def test_simulated_evolution_keeps_invariants(engine, fast_client, clock):
    with Simulator(instances=2, chats=40, seed=3) as s:
        from etl.simulator import ChangeRates

        s.rates.__dict__.update(ChangeRates(0.1, 0.1, 0.1, 0.2, 0.05).__dict__)
        instances = [make_instance(s, i) for i in s.instance_ids]
        register_instances(engine, instances)
        syncer = Syncer(engine, fast_client, clock=clock)
        for _ in range(6):
            for i in instances:
                assert syncer.sync(i).status == "ok"
            check_history_invariants(engine)
            # chats table equals the simulator's current payload
            for i in instances:
                present = {
                    r.chat_id
                    for r in rows(
                        engine,
                        "SELECT chat_id FROM chats WHERE instance_id = :i AND removed_at IS NULL",
                        i=i.id_instance,
                    )
                }
                assert present == {c["id"] for c in s.chats(i.id_instance)}
            s.step()
            clock.advance(60)
        assert scalar(engine, "SELECT SUM(ephemeral_changes) FROM sync_runs") > 0


def test_removal_and_reappearance(sim, engine, csyncer, inst, clock):
    base = chats_list(10)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    removed_at = clock.advance(60)
    sim.set_chats(inst.id_instance, base[:8])
    out = csyncer.sync(inst)
    assert (out.status, out.chats_removed) == ("ok", 2)
    gone = chat_row(engine, inst.id_instance, base[9]["id"])
    assert gone.removed_at is not None
    assert table_counts(engine)["chats"] == 10  # nothing deleted
    # unchanged after removal: removed chats are not removed again
    clock.advance(60)
    assert csyncer.sync(inst).chats_removed == 0
    clock.advance(60)
    sim.set_chats(inst.id_instance, base)
    out = csyncer.sync(inst)
    assert (out.chats_updated, out.chats_removed) == (2, 0)
    with engine.connect() as conn:
        back = conn.execute(
            select(Chat.removed_at, Chat.updated_at).where(Chat.chat_id == base[9]["id"])
        ).one()
    assert back.removed_at is None and back.updated_at == clock.now
    assert removed_at < back.updated_at
    check_history_invariants(engine)


def test_count_limited_list_never_removes(sim, engine, csyncer, inst):
    sim.set_chats(inst.id_instance, chats_list(10))
    csyncer.sync(inst)
    limited = make_instance(sim, count=3)
    out = csyncer.sync(limited)
    assert (out.status, out.chats_received, out.chats_removed) == ("ok", 3, 0)
    assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 10


def test_empty_list_is_an_anomaly(sim, engine, csyncer, inst):
    sim.set_chats(inst.id_instance, chats_list(5))
    csyncer.sync(inst)
    before = rows(engine, "SELECT * FROM chats ORDER BY chat_id")
    sim.set_fault(inst.id_instance, Fault(mode="empty"))
    out = csyncer.sync(inst)
    assert (out.status, out.error_kind, out.chats_removed) == ("anomaly", "empty_response", 0)
    assert rows(engine, "SELECT * FROM chats ORDER BY chat_id") == before
    run = rows(engine, "SELECT status, error_kind FROM sync_runs ORDER BY id DESC")[0]
    assert tuple(run) == ("anomaly", "empty_response")


def test_mass_disappearance_guard_and_confirmation(sim, engine, csyncer, inst, clock):
    base = chats_list(10)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    shrunk = base[:4]  # 6 of 10 vanish: above the 50% threshold
    sim.set_chats(inst.id_instance, shrunk)
    for attempt in (1, 2):
        clock.advance(60)
        out = csyncer.sync(inst)
        assert (out.status, out.error_kind) == ("anomaly", "mass_removal"), attempt
        assert f"{attempt}/3" in (out.error or "")
        assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 10
    clock.advance(60)
    out = csyncer.sync(inst)  # third consecutive identical list: real, applied
    assert (out.status, out.chats_removed) == ("ok", 6)
    assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 4


def test_mass_disappearance_streak_resets_on_a_different_list(sim, engine, csyncer, inst, clock):
    base = chats_list(10)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    for shrunk in (base[:4], base[:3], base[:4], base[:4]):
        clock.advance(60)
        sim.set_chats(inst.id_instance, shrunk)
        assert csyncer.sync(inst).status == "anomaly"
    # a normal list clears the streak
    sim.set_chats(inst.id_instance, base)
    assert csyncer.sync(inst).status == "ok"
    sim.set_chats(inst.id_instance, base[:4])
    out = csyncer.sync(inst)
    assert out.status == "anomaly" and "1/3" in (out.error or "")


def test_random_partial_lists_never_confirm_a_mass_removal(sim, engine, csyncer, inst, clock):
    """A glitch returning a different 40% of a big list each time is never applied (the
    sample of missing ids is 32 of ~120, so one of them always comes back)."""
    import random

    rnd = random.Random(5)
    base = chats_list(200)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    for _ in range(6):
        clock.advance(60)
        sim.set_chats(inst.id_instance, rnd.sample(base, 80))
        out = csyncer.sync(inst)
        assert (out.status, out.error_kind) == ("anomaly", "mass_removal")
    assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 200


def test_a_big_clean_up_is_applied_while_chats_keep_changing(sim, engine, csyncer, inst, clock):
    base = chats_list(300)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    kept = base[:100]
    statuses = []
    for tick in range(3):
        clock.advance(60)
        # 200 deleted; each tick a few more go and the kept ones get renamed
        current = [dict(c, name=f"{c['name']}-{tick}") for c in kept[: 100 - tick]]
        sim.set_chats(inst.id_instance, current)
        statuses.append(csyncer.sync(inst).status)
    assert statuses == ["anomaly", "anomaly", "ok"]
    assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 98


def test_mass_removal_threshold_is_configurable(sim, engine, csyncer, inst):
    base = chats_list(10)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    sim.set_chats(inst.id_instance, base[:4])
    lenient = make_instance(sim, mass_removal_threshold=0.7)
    out = csyncer.sync(lenient)
    assert (out.status, out.chats_removed) == ("ok", 6)


def test_per_row_rejection(sim, engine, csyncer, inst):
    good = chats_list(3)
    bad = [
        "not an object",
        42,
        None,
        {"name": "no id"},
        {"id": ""},
        {"id": "   "},
        {"id": True},
        {"id": "null@c.us"},
        dict(good[0]),  # duplicate of the first: first wins
    ]
    # fields in a form not understood: the chat is kept, the field treated as missing
    tolerated = [
        {"id": "5@c.us", "name": [5]},
        {"id": "6@c.us", "archive": "yes"},
        {"id": "7@c.us", "ephemeralExpiration": "86400"},  # read as 86400
        {"id": "8@c.us", "ephemeralExpiration": 86400, "ephemeralSettingTimestamp": 1.5},
        {"id": "9@c.us", "type": ["user"]},
    ]
    sim.set_chats(inst.id_instance, good + bad + tolerated)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_received, out.chats_inserted) == ("ok", 17, 8)
    assert out.chats_rejected == len(bad)
    assert scalar(engine, "SELECT COUNT(*) FROM chats") == 8
    run = rows(engine, "SELECT chats_rejected, chats_received, error FROM sync_runs")[0]
    assert tuple(run)[:2] == (9, 17)
    # what was not understood is said in the run's error, by reason and count
    assert run.error.startswith("fields not understood (stored values kept): ")
    for reason in ("archive has type str (1)", "ephemeralSettingTimestamp has type float (1)"):
        assert reason in run.error
    assert chat_row(engine, inst.id_instance, "7@c.us").ephemeral_expiration == 86400


def test_a_chat_whose_fields_are_not_understood_is_kept_and_updated(sim, engine, csyncer, inst):
    base = chats_list(4)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    odd = dict(base[1], name="Renamed", archive="maybe", ephemeralExpiration=True)
    sim.set_chats(inst.id_instance, [base[0], odd, base[2], base[3]])
    out = csyncer.sync(inst)
    assert (out.chats_rejected, out.chats_removed, out.chats_updated) == (0, 0, 1)
    row = chat_row(engine, inst.id_instance, base[1]["id"])
    assert (row.name, row.archived, row.removed_at) == ("Renamed", False, None)
    # an element without a readable id makes the list incomplete: no removals at all
    sim.set_chats(inst.id_instance, [base[0], {"name": "who?"}])
    out = csyncer.sync(inst)
    assert (out.status, out.chats_removed) == ("ok", 0)
    assert scalar(engine, "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL") == 4


def test_ids_are_normalised_and_kept_opaque(sim, engine, csyncer, inst):
    sim.set_chats(
        inst.id_instance,
        [
            chat("79001234567"),
            {"id": 79007654321, "name": "int id"},
            chat("123456789012345@lid"),
            chat("120363043968066561@newsletter", kind="channel"),
            chat("status@broadcast", kind="broadcast"),
            chat("79001234567@c.us", name="dup after normalising"),
        ],
    )
    out = csyncer.sync(inst)
    assert (out.chats_inserted, out.chats_rejected) == (5, 1)
    got = {r.chat_id: r.chat_type for r in rows(engine, "SELECT chat_id, chat_type FROM chats")}
    assert got == {
        "79001234567@c.us": "user",
        "79007654321@c.us": "user",
        "123456789012345@lid": "user",
        "120363043968066561@newsletter": "channel",
        "status@broadcast": "broadcast",
    }


def test_nul_emoji_long_and_hostile_names(sim, engine, csyncer, inst):
    long_name = "Ω" * 10_000
    hostile = "'); DROP TABLE chats; --"
    sim.set_chats(
        inst.id_instance,
        [
            chat("1@c.us", name="Ma\x00ria"),
            chat("2@c.us", name="Team 🚀 Alpha 👩‍👩‍👧"),
            chat("3@c.us", name=long_name),
            chat("4@c.us", name="مرحبا بالعالم"),
            chat("5@c.us", name=hostile),
            chat("6\x00@c.us", name=""),
        ],
    )
    out = csyncer.sync(inst)
    assert (out.status, out.chats_inserted) == ("ok", 6)
    names = {r.chat_id: r.name for r in rows(engine, "SELECT chat_id, name FROM chats")}
    assert names["1@c.us"] == "Maria"
    assert names["2@c.us"] == "Team 🚀 Alpha 👩‍👩‍👧"
    assert names["3@c.us"] == long_name
    assert names["4@c.us"] == "مرحبا بالعالم"
    assert names["5@c.us"] == hostile
    assert names["6@c.us"] == ""
    assert scalar(engine, "SELECT COUNT(*) FROM chats") == 6


def test_rename_and_archive_update_only_that_chat(sim, engine, csyncer, inst, clock):
    base = chats_list(3)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    t1 = clock.advance(60)
    sim.set_chats(
        inst.id_instance, [dict(base[0], name="Renamed"), dict(base[1], archive=True), base[2]]
    )
    out = csyncer.sync(inst)
    assert (out.chats_updated, out.ephemeral_changes) == (2, 0)
    assert chat_row(engine, inst.id_instance, base[0]["id"]).name == "Renamed"
    assert bool(chat_row(engine, inst.id_instance, base[1]["id"]).archived) is True
    with engine.connect() as conn:
        stamps = {r[0]: r[1] for r in conn.execute(select(Chat.chat_id, Chat.updated_at))}
    assert stamps[base[0]["id"]] == t1 and stamps[base[1]["id"]] == t1
    assert stamps[base[2]["id"]] < t1
    assert scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history") == 3


def test_missing_ephemeral_fields_keep_the_stored_setting(sim, engine, csyncer, inst, clock):
    sim.set_chats(inst.id_instance, [chat("1@c.us", expiration=86400, stamp=1_700_000_000)])
    csyncer.sync(inst)
    clock.advance(60)
    sim.set_chats(inst.id_instance, [{"id": "1@c.us", "name": "Someone", "type": "user"}])
    out = csyncer.sync(inst)
    assert (out.status, out.ephemeral_changes) == ("ok", 0)
    assert chat_row(engine, inst.id_instance, "1@c.us").ephemeral_expiration == 86400
    check_history_invariants(engine)


def test_api_failure_changes_nothing_and_is_recorded(sim, engine, csyncer, inst):
    csyncer.sync(inst)
    before = rows(engine, "SELECT * FROM chats ORDER BY chat_id")
    for fault in (Fault(status=500), Fault(mode="html"), Fault(mode="object"), Fault(status=401)):
        sim.set_fault(inst.id_instance, fault)
        out = csyncer.sync(inst)
        assert out.status == "failed"
        assert out.sync_run_id is not None
    assert rows(engine, "SELECT * FROM chats ORDER BY chat_id") == before
    kinds = [r.error_kind for r in rows(engine, "SELECT error_kind FROM sync_runs ORDER BY id")]
    assert kinds == [None, "server_error", "bad_payload", "bad_payload", "unauthorized"]


def test_two_syncs_of_one_instance_never_overlap_in_a_process(sim, engine, csyncer, inst):
    sim.set_fault(inst.id_instance, Fault(delay=1.5))
    results = []
    t = threading.Thread(target=lambda: results.append(csyncer.sync(inst)))
    t.start()
    import time

    # the first sync has fetched (it holds the instance from before its request until
    # its answer, 1.5 s later): waiting for that, not a fixed sleep, orders the two syncs
    # on a loaded machine too
    deadline = time.monotonic() + 10
    while sim.request_count(inst.id_instance) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = csyncer.sync(inst)
    t.join()
    assert second.status == "skipped"
    assert results[0].status == "ok"
    assert scalar(engine, "SELECT COUNT(*) FROM sync_runs") == 1


def test_register_instances_disables_dropped_ones(sim, engine):
    a, b = (make_instance(sim, i) for i in sim.instance_ids[:2])
    register_instances(engine, [a, b])
    register_instances(engine, [a])
    got = {r.id_instance: bool(r.enabled) for r in rows(engine, "SELECT * FROM instances")}
    assert got == {a.id_instance: True, b.id_instance: False}
    cols = {c.lower() for c in rows(engine, "SELECT * FROM instances")[0]._fields}
    assert not any("token" in c for c in cols)


def test_empty_list_breaks_the_mass_removal_streak(sim, engine, csyncer, inst, clock):
    base = chats_list(10)
    sim.set_chats(inst.id_instance, base)
    csyncer.sync(inst)
    sim.set_chats(inst.id_instance, base[:4])
    assert "1/3" in (csyncer.sync(inst).error or "")
    sim.set_fault(inst.id_instance, Fault(mode="empty", times=1))
    assert csyncer.sync(inst).error_kind == "empty_response"
    sim.set_fault(inst.id_instance, Fault(status=500, times=4))
    assert csyncer.sync(inst).status == "failed"  # a failed fetch neither counts nor breaks
    for expected in ("1/3", "2/3"):
        out = csyncer.sync(inst)
        assert out.status == "anomaly" and expected in (out.error or "")
    assert csyncer.sync(inst).chats_removed == 6


def test_run_row_times_cover_the_database_writes(sim, engine, csyncer, inst):
    out = csyncer.sync(inst)
    run = rows(engine, "SELECT finished_at, duration_ms FROM sync_runs")[0]
    assert run.duration_ms == out.duration_ms
    with engine.connect() as conn:
        from etl.models import SyncRun

        finished = conn.execute(select(SyncRun.finished_at)).scalar_one()
    assert finished == out.finished_at


def test_first_load_in_bulk_keeps_every_byte_of_hostile_names(sim, engine, csyncer, inst):
    """An instance's first load goes as one JSON text on PostgreSQL (``_pg_write_first_load``):
    names with JSON's and COPY's escapes, quotes, control characters and non-BMP text arrive
    exactly."""
    nasty = [
        "tab\there",
        "new\nline",
        "back\\slash",
        "\\N",
        "\\.",
        "'); DROP TABLE chats; --",
        'quote " and , comma',
        "carriage\rreturn",
        "emoji 😀 ✓",
        "",
        "   ",
    ]
    chats = [
        chat(
            f"7955{i:07d}@c.us",
            name=nasty[i % len(nasty)] + f" #{i}",
            expiration=604800,
            stamp=1_700_000_000 + i,
        )
        for i in range(200)
    ]
    sim.set_chats(inst.id_instance, chats)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_inserted) == ("ok", 200)
    stored = dict(rows(engine, "SELECT chat_id, name FROM chats"))
    assert stored == {c["id"]: c["name"] for c in chats}
    assert scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history") == 200
    assert scalar(engine, "SELECT COUNT(*) FROM chat_events WHERE event_type = 'created'") == 200
    check_history_invariants(engine)
    # and the next identical tick sees nothing to do (the bulk path stored what it read)
    out = csyncer.sync(inst)
    assert (out.chats_inserted, out.chats_updated, out.ephemeral_changes) == (0, 0, 0)


def test_elements_skipped_as_unchanged_are_rechecked_after_another_writer(
    sim, engine, fast_client, inst, clock
):
    """A skips an element identical to the last list *it* applied; when B wrote in between,
    A's memory is stale and the element must be decoded and applied after all."""
    a = Syncer(engine, fast_client, clock=clock)
    b = Syncer(engine, fast_client, clock=clock)
    original = chats_list(100)
    sim.set_chats(inst.id_instance, original)
    assert a.sync(inst).chats_inserted == 100
    renamed = [dict(c, name="renamed by B") if i < 10 else c for i, c in enumerate(original)]
    clock.advance(60)
    sim.set_chats(inst.id_instance, renamed)
    assert b.sync(inst).chats_updated == 10
    clock.advance(60)
    sim.set_chats(inst.id_instance, original)  # byte-identical to what A applied last
    out = a.sync(inst)
    assert (out.status, out.chats_updated) == ("ok", 10)
    names = dict(rows(engine, "SELECT chat_id, name FROM chats"))
    assert names == {c["id"]: c["name"] for c in original}
    # and with nobody else writing, A's next identical tick skips them all again
    clock.advance(60)
    out = a.sync(inst)
    assert (out.chats_updated, out.chats_inserted, out.chats_received) == (0, 0, 100)


def test_a_changed_element_is_judged_against_another_writers_rows(
    sim, engine, fast_client, inst, clock
):
    """A's tick decides which chats to read back from what A itself last wrote (on
    PostgreSQL that read goes out with the lock). B wrote in between, so A's choice is
    stale: chat 3 looks unchanged to A but B renamed it. The tick must be judged against
    the stored rows after all and put chat 3's name back."""
    a = Syncer(engine, fast_client, clock=clock)
    b = Syncer(engine, fast_client, clock=clock)
    original = chats_list(20)
    sim.set_chats(inst.id_instance, original)
    assert a.sync(inst).chats_inserted == 20
    clock.advance(60)
    sim.set_chats(
        inst.id_instance,
        [dict(c, name="renamed by B") if i == 3 else c for i, c in enumerate(original)],
    )
    assert b.sync(inst).chats_updated == 1
    clock.advance(60)
    # no element byte-identical to what A applied (an extra field), so nothing is skipped
    # unparsed; chat 5 renamed, so A has something to read back
    expected = [dict(c, name="renamed by A") if i == 5 else c for i, c in enumerate(original)]
    sim.set_chats(inst.id_instance, [dict(c, extra=1) for c in expected])
    out = a.sync(inst)
    assert (out.status, out.chats_updated) == ("ok", 2)
    names = dict(rows(engine, "SELECT chat_id, name FROM chats"))
    assert names == {c["id"]: c["name"] for c in expected}


def test_a_tick_that_waits_for_the_lock_judges_the_rows_written_meanwhile(
    sim, engine, fast_client, inst, clock
):
    """Another writer holds the instance (on PostgreSQL its advisory lock, on SQLite the
    write lock) and renames chat 5. A's tick, which renames it too, has to wait; whatever
    it read before the wait (the read-back rides on the lock statement) is stale, and the
    event must name B's value as the old one."""
    a = Syncer(engine, fast_client, clock=clock)
    iid = inst.id_instance
    original = chats_list(10)
    sim.set_chats(iid, original)
    assert a.sync(inst).chats_inserted == 10
    clock.advance(60)
    # an extra field: no element byte-identical to A's last list, so every one is parsed
    by_a = [dict(c, name="by A") if i == 5 else c for i, c in enumerate(original)]
    sim.set_chats(iid, [dict(c, extra=1) for c in by_a])
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (instance_lock_key(iid),))
            conn.execute(
                text("UPDATE chats SET name = 'by B' WHERE chat_id = :c"), {"c": original[5]["id"]}
            )
            conn.execute(
                text("UPDATE instance_sync_state SET version = version + 1 WHERE instance_id = :i"),
                {"i": iid},
            )
            held.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert held.wait(5)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    try:
        out = a.sync(inst)
    finally:
        release.set()
        thread.join()
    assert (out.status, out.chats_updated) == ("ok", 1)
    renamed = rows(
        engine, "SELECT old_value, new_value FROM chat_events WHERE event_type = 'renamed'"
    )
    assert [tuple(r) for r in renamed] == [("by B", "by A")]


def test_a_steady_tick_is_two_statements_on_postgresql(sim, engine, csyncer, inst, clock):
    """Lock + state bump + read back of the changed chats, then one statement for every
    write (history closes included). The rows must be those of the long way."""
    statements: list[str] = []
    original = [chat(f"{i}@c.us", name=f"Chat {i}") for i in range(10)]
    sim.set_chats(inst.id_instance, original)
    csyncer.sync(inst)
    changed_at = clock.advance(60) - timedelta(seconds=30)
    steady = [
        chat("0@c.us", name="Chat 0", expiration=86400, stamp=ts(changed_at)),  # close + open
        chat("1@c.us", name="Renamed"),
        *original[2:9],  # 9@c.us removed
        chat("10@c.us", name="New"),
    ]
    sim.set_chats(inst.id_instance, steady)

    def record(conn, cursor, sql, params, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(sql)

    event.listen(engine, "before_cursor_execute", record)
    try:
        out = csyncer.sync(inst)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert (out.status, out.chats_inserted, out.chats_updated, out.chats_removed) == (
        "ok",
        1,
        2,
        1,
    )
    assert out.ephemeral_changes == 1
    if engine.dialect.name == "postgresql":
        assert len(statements) == 2, statements
    h = history(engine, inst.id_instance, "0@c.us")
    assert [(r.ephemeral_expiration, as_utc(r.valid_to)) for r in h] == [
        (0, changed_at),
        (86400, None),
    ]
    check_history_invariants(engine)
    names = dict(rows(engine, "SELECT chat_id, name FROM chats WHERE removed_at IS NULL"))
    assert names == {c["id"]: c["name"] for c in steady}


def test_a_write_that_the_database_rejects_fails_the_tick_cleanly(sim, engine, csyncer, inst):
    """A first load rejected by the database: the tick is a recorded `database` failure,
    nothing is half-written, and the next tick loads everything."""
    if engine.dialect.name == "postgresql":
        ddl = [
            "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN IF NEW.name = 'boom' THEN "
            "RAISE EXCEPTION 'rejected by a trigger'; END IF; RETURN NEW; END $$ "
            "LANGUAGE plpgsql",
            "CREATE TRIGGER boom BEFORE INSERT ON chats FOR EACH ROW EXECUTE FUNCTION boom()",
        ]
        undo = ["DROP TRIGGER boom ON chats", "DROP FUNCTION boom()"]
    else:
        ddl = [
            "CREATE TRIGGER boom BEFORE INSERT ON chats WHEN NEW.name = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'rejected by a trigger'); END"
        ]
        undo = ["DROP TRIGGER boom"]
    with engine.begin() as conn:
        for sql in ddl:
            conn.exec_driver_sql(sql)
    chats = chats_list(100)
    chats[70]["name"] = "boom"
    sim.set_chats(inst.id_instance, chats)
    out = csyncer.sync(inst)
    assert (out.status, out.error_kind) == ("failed", "database"), out
    assert "rejected by a trigger" in (out.error or "")
    run = rows(engine, "SELECT status, error_kind FROM sync_runs")
    assert [tuple(r) for r in run] == [("failed", "database")]
    assert scalar(engine, "SELECT COUNT(*) FROM chats") == 0
    assert scalar(engine, "SELECT COUNT(*) FROM chat_ephemeral_history") == 0
    with engine.begin() as conn:
        for sql in undo:
            conn.exec_driver_sql(sql)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_inserted) == ("ok", 100)
    check_history_invariants(engine)

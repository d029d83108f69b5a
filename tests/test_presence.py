"""Presence (``chat_presence``) on SQLite and PostgreSQL, through the simulator over HTTP:
which lists open and close periods, what a clock that steps back does, and revision 0008's
rebuild of presence from an older database (equal to what the sync writes, and what it does
where the data cannot say).

The as-of queries of docs/queries.md over presence are checked by tests/test_bi.py; the
hypothesis model of tests/test_properties.py checks presence against every snapshot it
applies.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from etl.db import downgrade, upgrade
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import chat, check_presence_invariants, rows

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def periods(engine: Engine, iid: int) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows(
        engine,
        "SELECT chat_id, valid_from, valid_to, sync_run_id FROM chat_presence "
        "WHERE instance_id = :i ORDER BY chat_id, valid_from, id",
        i=iid,
    ):
        out.setdefault(r[0], []).append((as_utc(r[1]), as_utc(r[2]), r[3]))
    return out


FIVE = [chat(f"{n}@c.us", name=f"c{n}") for n in range(1, 6)]


def test_removals_returns_and_incomplete_lists(sim: Simulator, engine: Engine, fast_client):
    inst = make_instance(sim)
    limited = make_instance(sim, sim.instance_ids[1], count=50)
    register_instances(engine, [inst, limited])
    clock = Clock()
    syncer = Syncer(engine, fast_client, clock=clock)
    iid, lid = inst.id_instance, limited.id_instance

    def tick(instance: Any, chats: list[Any], *, minutes: int = 60, **fault: Any) -> Any:
        clock.now += timedelta(minutes=minutes)
        sim.set_chats(instance.id_instance, chats)
        sim.set_fault(instance.id_instance, Fault(**fault) if fault else None)
        return syncer.sync(instance)

    first = tick(inst, FIVE)
    t1 = clock.now
    removed = tick(inst, [c for c in FIVE if c["id"] != "2@c.us"])
    t2 = clock.now
    # an anomaly (empty list) and a failure write no presence
    assert tick(inst, []).error_kind == "empty_response"
    assert tick(inst, FIVE, status=500).status == "failed"
    back = tick(inst, FIVE)
    t3 = clock.now
    got = periods(engine, iid)
    assert got["2@c.us"] == [(t1, t2, first.sync_run_id), (t3, None, back.sync_run_id)]
    assert got["1@c.us"] == [(t1, None, first.sync_run_id)]
    assert removed.chats_removed == 1

    # a count-limited list removes nothing and closes nothing, but a chat it shows for the
    # first time is in the list
    tick(limited, FIVE[:3])
    s1 = clock.now
    tick(limited, [FIVE[0], chat("9@c.us")])
    s2 = clock.now
    got = periods(engine, lid)
    assert {c: [p[:2] for p in ps] for c, ps in got.items()} == {
        "1@c.us": [(s1, None)],
        "2@c.us": [(s1, None)],
        "3@c.us": [(s1, None)],
        "9@c.us": [(s2, None)],
    }
    check_presence_invariants(engine)


def test_same_clock_and_a_clock_that_steps_back(sim: Simulator, engine: Engine, fast_client):
    inst = make_instance(sim)
    register_instances(engine, [inst])
    clock = Clock()
    syncer = Syncer(engine, fast_client, clock=clock)
    iid = inst.id_instance

    def tick(chats: list[Any], at: datetime) -> None:
        clock.now = at
        sim.set_chats(iid, chats)
        assert syncer.sync(inst).status == "ok"

    tick(FIVE, T0)
    tick(FIVE[1:], T0)  # removed at the same clock reading: an empty period
    tick(FIVE, T0 + timedelta(hours=1))
    tick(FIVE[1:], T0 + timedelta(minutes=30))  # the clock stepped back half an hour
    tick(FIVE, T0)  # and back further still
    hour = T0 + timedelta(hours=1)
    assert [p[:2] for p in periods(engine, iid)["1@c.us"]] == [
        (T0, T0),
        (hour, hour),  # never ends before it starts
        (hour, None),  # never starts before the previous one ended
    ]
    got = rows(
        engine,
        "SELECT COUNT(*) FROM present_ephemeral_history WHERE chat_id = '1@c.us' "
        "AND valid_to IS NOT NULL",
    )
    assert got[0][0] == 0, "empty periods are not in the as-of view"


def _live_then_rebuilt(engine: Engine) -> tuple[list[Any], list[Any]]:
    query = (
        "SELECT instance_id, chat_id, valid_from, valid_to, sync_run_id FROM chat_presence "
        "ORDER BY instance_id, chat_id, valid_from"
    )
    live = [tuple(r) for r in rows(engine, query)]
    downgrade(engine, "0006")
    upgrade(engine)
    return live, [tuple(r) for r in rows(engine, query)]


def test_the_migration_rebuilds_what_the_sync_wrote(engine: Engine, fast_client):
    """A simulator fleet with removals and returns synced at head; back to 0006 (presence
    and the cursors dropped) and up again: the rebuilt periods are the live ones."""
    start = T0
    from etl.simulator import ChangeRates

    rates = ChangeRates(new=0.05, rename=0.02, ephemeral=0.05, removal=0.08, returns=0.4)
    clock = Clock()
    with Simulator(
        instances=3, chats=30, seed=3, rates=rates, start_time=int(start.timestamp())
    ) as sim:
        instances = [make_instance(sim, i) for i in sim.instance_ids]
        register_instances(engine, instances, now=start)
        syncer = Syncer(engine, fast_client, clock=clock)
        for step in range(12):
            clock.now = start + timedelta(hours=step)
            for inst in instances:
                assert syncer.sync(inst).status in ("ok", "anomaly")
            sim.step()
    live, rebuilt = _live_then_rebuilt(engine)
    returned = {(r[0], r[1]) for r in live if r[3] is not None} & {
        (r[0], r[1]) for r in live if r[3] is None
    }
    assert len(returned) >= 3, "the data set has too few returns to prove anything"
    assert rebuilt == live
    check_presence_invariants(engine)
    # the cursors start at 1 for what was there; the next write takes a larger number
    assert {r[0] for r in rows(engine, "SELECT DISTINCT change_seq FROM chats")} == {1}


def test_the_migration_says_what_it_cannot_know(engine: Engine):
    """Rows as older releases left them: a chat from before chat_events (removed, no
    events), one whose return was not recorded, one whose removal was not recorded."""
    downgrade(engine, "0006")
    t = [T0 + timedelta(hours=h) for h in range(10)]
    ts = [x.strftime("%Y-%m-%d %H:%M:%S.%f") for x in t]  # SQLite's stored form
    bind = ts if engine.dialect.name == "sqlite" else t
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (id_instance, label, api_url, enabled, created_at, "
                "updated_at) VALUES (1, 'x', 'http://127.0.0.1', :y, :t, :t)"
            ),
            {"y": True, "t": bind[0]},
        )
        for cid, first, updated, removed in (
            ("old@c.us", 0, 3, 3),  # before events: removed at 3, nothing else known
            ("back@c.us", 0, 7, None),  # removed at 2 (event), present now, no reappeared
            ("gone@c.us", 0, 5, 5),  # removed now, its removal event missing
            ("fine@c.us", 0, 8, None),  # removed at 2, back at 6 (both recorded), renamed at 8
        ):
            conn.execute(
                text(
                    "INSERT INTO chats (instance_id, chat_id, chat_type, name, archived, "
                    "ephemeral_expiration, first_seen_at, updated_at, removed_at) "
                    "VALUES (1, :c, 'user', 'n', :f, 0, :first, :updated, :removed)"
                ),
                {
                    "c": cid,
                    "f": False,
                    "first": bind[first],
                    "updated": bind[updated],
                    "removed": None if removed is None else bind[removed],
                },
            )
        for cid, kind, at in (
            ("back@c.us", "created", 0),
            ("back@c.us", "removed", 2),
            ("gone@c.us", "created", 0),
            ("fine@c.us", "created", 0),
            ("fine@c.us", "removed", 2),
            ("fine@c.us", "reappeared", 6),
        ):
            conn.execute(
                text(
                    "INSERT INTO chat_events (instance_id, chat_id, event_type, occurred_at) "
                    "VALUES (1, :c, :k, :at)"
                ),
                {"c": cid, "k": kind, "at": bind[at]},
            )
    upgrade(engine)
    got = {c: [p[:2] for p in ps] for c, ps in periods(engine, 1).items()}
    assert got == {
        "old@c.us": [(t[0], t[3])],
        "back@c.us": [(t[0], t[2]), (t[7], None)],  # from updated_at: its return unknown
        "gone@c.us": [(t[0], t[5])],
        "fine@c.us": [(t[0], t[2]), (t[6], None)],
    }

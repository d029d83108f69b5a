"""The pure parts of a tick, without a database or HTTP: the plan's diff rules, the guards,
the removal rule, PostgreSQL's statements as text, and the hypothesis model of
tests/test_properties.py run against the plan alone.

These run in milliseconds; tests/test_sync.py and tests/test_properties.py prove the same
rules end to end on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.config import Instance
from etl.errors import ErrorKind
from etl.payload import ChatRecord, decode_chats
from etl.sync.guards import CLEAR, GuardState, judge, parse_vanished_sample
from etl.sync.identity import Identity, find_switch, judge_switch
from etl.sync.plan import (
    Event,
    FirstLoad,
    HistoryClose,
    IdChange,
    PresenceClose,
    PresenceOpen,
    TickPlan,
    add_id_changes,
    plan_tick,
    vanished_chats,
)
from etl.sync.rules import MAX_CLOCK_SKEW, choose_valid_from, first_valid_from_sql
from etl.sync.store import pg_sql
from tests.conftest import instance_at
from tests.test_properties import STEPS, Model, Step, _render

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
IID = 1101000001


@dataclass
class Stored:
    """A stored chat as the store reads it back (``StoredChat``)."""

    chat_id: str
    chat_type: str = "user"
    name: str = "Ann"
    archived: bool = False
    ephemeral_expiration: int = 0
    ephemeral_setting_at: datetime | None = None
    removed_at: datetime | None = None
    open_from: datetime | None = NOW - timedelta(days=10)


def record(chat_id: str, **kw: Any) -> ChatRecord:
    values: dict[str, Any] = {
        "chat_type": "user",
        "name": "Ann",
        "archived": False,
        "ephemeral_expiration": 0,
        "ephemeral_setting_at": None,
        "ephemeral_known": True,
    }
    values.update(kw)
    if not values["ephemeral_known"]:
        values["ephemeral_expiration"] = values["ephemeral_setting_at"] = None
    return ChatRecord(chat_id=chat_id, **values)


def plan_of(
    chats: list[ChatRecord], stored: list[Stored], vanished: frozenset[str] = frozenset()
) -> TickPlan:
    by_id = {s.chat_id: s for s in stored}
    return plan_tick(
        instance_id=IID,
        candidates=chats,
        stored=by_id,
        in_table=by_id,
        vanished=vanished,
        now=NOW,
    )


def kinds(plan: TickPlan) -> list[tuple[str, str]]:
    return [(e.chat_id, e.event_type) for e in plan.events]


# -- the diff rules ---------------------------------------------------------------------------


def test_an_empty_name_keeps_the_stored_one_so_renames_do_not_flicker() -> None:
    """Names that come and go ("Bob", "", "Bob") are not a rename each time."""
    plan = plan_of([record("1@c.us", name="")], [Stored("1@c.us", name="Bob")])
    assert (plan.upserts, plan.events, plan.updated) == ([], [], 0)
    # a real rename still is one, and a chat first seen without a name gets one later
    plan = plan_of([record("1@c.us", name="Robert")], [Stored("1@c.us", name="Bob")])
    assert [(e.event_type, e.old_value, e.new_value) for e in plan.events] == [
        ("renamed", "Bob", "Robert")
    ]
    plan = plan_of([record("2@c.us", name="Ann")], [Stored("2@c.us", name="")])
    assert [(e.event_type, e.old_value, e.new_value) for e in plan.events] == [
        ("renamed", "", "Ann")
    ]


def test_an_unsaid_archive_flag_keeps_the_stored_one() -> None:
    unsaid = record("1@c.us", archived=False, archive_known=False)
    plan = plan_of([unsaid], [Stored("1@c.us", archived=True)])
    assert (plan.upserts, plan.events) == ([], [])
    # a change of something else writes the stored flag, not the element's default
    renamed = record("1@c.us", name="Bob", archived=False, archive_known=False)
    plan = plan_of([renamed], [Stored("1@c.us", archived=True)])
    assert plan.upserts[0]["archived"] is True and kinds(plan) == [("1@c.us", "renamed")]
    # a new chat with no flag is not archived
    plan = plan_of([record("2@c.us", archived=False, archive_known=False)], [])
    assert plan.inserts[0]["archived"] is False


def test_a_platform_without_disappearing_messages_gets_no_history() -> None:
    chats = [record("10000000", ephemeral_known=False), record("-5098765432", chat_type="group")]
    plan = plan_tick(
        instance_id=IID,
        candidates=chats,
        stored={},
        in_table=(),
        vanished=set(),
        now=NOW,
        history=False,
    )
    assert plan.opens == [] and plan.inserted == 2
    assert FirstLoad(IID, NOW, chats, history=False).expand().opens == []


def test_id_changes_are_events_and_counted() -> None:
    plan = plan_of([], [Stored("79000000001@c.us")])
    add_id_changes(plan, [IdChange("79000000001@c.us", "79000000001@c.us", "1@lid")])
    assert [(e.chat_id, e.event_type, e.old_value, e.new_value) for e in plan.events] == [
        ("79000000001@c.us", "id_changed", "79000000001@c.us", "1@lid")
    ]
    assert plan.counts.ids_changed == 1 and plan.events[0].occurred_at == NOW


def test_a_new_chat_is_inserted_with_its_first_period_and_a_created_event() -> None:
    stamp = NOW - timedelta(days=30)
    plan = plan_of([record("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=stamp)], [])
    assert [r["chat_id"] for r in plan.inserts] == ["1@c.us"] and plan.upserts == []
    assert plan.inserts[0]["removed_at"] is None and plan.inserts[0]["first_seen_at"] == NOW
    assert kinds(plan) == [("1@c.us", "created")] and plan.events[0].new_value == "Ann"
    assert [(h.chat_id, h.valid_from, h.ephemeral_expiration) for h in plan.opens] == [
        ("1@c.us", stamp, 86400)
    ]  # a setting made last month starts last month
    assert plan.closes == [] and plan.counts.inserted == 1 and plan.counts.updated == 0
    assert plan.counts.ephemeral_changes == 0  # a first sighting is not a change


def test_a_new_chat_whose_row_exists_is_upserted() -> None:
    """The snapshot says the chat is in the table, but its row was not read back."""
    plan = plan_tick(
        instance_id=IID,
        candidates=[record("1@c.us")],
        stored={},
        in_table={"1@c.us"},
        vanished=set(),
        now=NOW,
    )
    assert plan.inserts == [] and [r["chat_id"] for r in plan.upserts] == ["1@c.us"]
    assert plan.counts.inserted == 1


def test_an_unchanged_chat_writes_nothing() -> None:
    plan = plan_of([record("1@c.us")], [Stored("1@c.us")])
    assert plan.chat_rows == [] and plan.events == [] and plan.opens == [] and plan.closes == []
    assert plan.counts == plan.counts.__class__()


def test_renamed_archived_unarchived_and_retyped() -> None:
    plan = plan_of(
        [
            record("1@c.us", name="Bob"),
            record("2@c.us", archived=True),
            record("3@c.us", archived=False),
            record("4@c.us", chat_type="group"),
        ],
        [Stored("1@c.us"), Stored("2@c.us"), Stored("3@c.us", archived=True), Stored("4@c.us")],
    )
    assert kinds(plan) == [
        ("1@c.us", "renamed"),
        ("2@c.us", "archived"),
        ("3@c.us", "unarchived"),
    ]  # a type change is written, with no event of its own
    assert [(e.old_value, e.new_value) for e in plan.events] == [
        ("Ann", "Bob"),
        ("false", "true"),
        ("true", "false"),
    ]
    assert [r["chat_id"] for r in plan.upserts] == ["1@c.us", "2@c.us", "3@c.us", "4@c.us"]
    assert plan.counts.updated == 4 and plan.opens == [] and plan.closes == []


def test_a_vanished_chat_is_marked_removed_and_its_history_stays_open() -> None:
    plan = plan_of(
        [], [Stored("2@c.us"), Stored("1@c.us")], vanished=frozenset({"2@c.us", "1@c.us"})
    )
    assert plan.removed == ["1@c.us", "2@c.us"]
    assert kinds(plan) == [("1@c.us", "removed"), ("2@c.us", "removed")]
    assert plan.closes == [] and plan.opens == [] and plan.counts.removed == 2


def test_a_chat_that_comes_back_reappears() -> None:
    plan = plan_of([record("1@c.us")], [Stored("1@c.us", removed_at=NOW - timedelta(hours=1))])
    assert kinds(plan) == [("1@c.us", "reappeared")]
    assert plan.upserts[0]["removed_at"] is None and plan.counts.updated == 1
    assert plan.opens == []  # same setting as when it left: the period goes on


def test_an_ephemeral_change_closes_the_period_and_opens_the_next_at_the_api_timestamp() -> None:
    stamp = NOW - timedelta(minutes=3)
    plan = plan_of(
        [record("1@c.us", ephemeral_expiration=604800, ephemeral_setting_at=stamp)],
        [Stored("1@c.us", ephemeral_expiration=86400)],
    )
    assert plan.closes == [HistoryClose("1@c.us", stamp)]
    assert [(h.valid_from, h.ephemeral_expiration) for h in plan.opens] == [(stamp, 604800)]
    assert plan.events == [Event("1@c.us", "ephemeral_changed", "86400", "604800", stamp)]
    assert plan.counts.ephemeral_changes == 1 and plan.counts.updated == 1


@pytest.mark.parametrize(
    "stamp,open_from,expected",
    [
        # trusted: after the open period's start and not beyond the skew
        (NOW - timedelta(minutes=3), NOW - timedelta(days=1), NOW - timedelta(minutes=3)),
        (NOW + MAX_CLOCK_SKEW, NOW - timedelta(days=1), NOW + MAX_CLOCK_SKEW),
        # too far ahead: the observation time
        (NOW + MAX_CLOCK_SKEW + timedelta(seconds=1), NOW - timedelta(days=1), NOW),
        # before the open period's start (out of order): the observation time
        (NOW - timedelta(days=2), NOW - timedelta(days=1), NOW),
        # unset (timer off is usually sent with 0): the observation time
        (None, NOW - timedelta(days=1), NOW),
        # the open period starts after our clock: just after it, never overlapping
        (None, NOW + timedelta(minutes=1), NOW + timedelta(minutes=1, microseconds=1)),
    ],
)
def test_when_the_next_period_starts(
    stamp: datetime | None, open_from: datetime, expected: datetime
) -> None:
    plan = plan_of(
        [record("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=stamp)],
        [Stored("1@c.us", open_from=open_from)],
    )
    assert [h.valid_from for h in plan.opens] == [expected]
    assert [c.valid_to for c in plan.closes] == [expected]
    assert choose_valid_from(stamp, open_from, NOW) == expected


def test_resetting_the_same_timer_is_a_new_period() -> None:
    before, after = NOW - timedelta(days=5), NOW - timedelta(minutes=1)
    plan = plan_of(
        [record("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=after)],
        [Stored("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=before)],
    )
    assert [c.valid_to for c in plan.closes] == [after] and plan.counts.ephemeral_changes == 1


def test_an_element_without_the_ephemeral_fields_keeps_the_stored_setting() -> None:
    stamp = NOW - timedelta(days=3)
    stored = Stored("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=stamp)
    plan = plan_of([record("1@c.us", name="Bob", ephemeral_known=False)], [stored])
    assert plan.opens == [] and plan.closes == [] and plan.counts.ephemeral_changes == 0
    row = plan.upserts[0]
    assert (row["ephemeral_expiration"], row["ephemeral_setting_at"]) == (86400, stamp)
    new = plan_of([record("2@c.us", ephemeral_known=False)], [])
    assert (new.inserts[0]["ephemeral_expiration"], new.opens[0].ephemeral_expiration) == (0, 0)
    assert new.opens[0].valid_from == NOW


def test_events_come_in_one_order_new_and_changed_then_removed_then_settings() -> None:
    plan = plan_of(
        [
            record("9@c.us"),
            record("1@c.us", name="Bob", ephemeral_expiration=86400, ephemeral_setting_at=NOW),
        ],
        [Stored("1@c.us"), Stored("5@c.us")],
        vanished=frozenset({"5@c.us"}),
    )
    assert kinds(plan) == [
        ("9@c.us", "created"),
        ("1@c.us", "renamed"),
        ("5@c.us", "removed"),
        ("1@c.us", "ephemeral_changed"),
    ]
    assert [h.chat_id for h in plan.opens] == ["9@c.us", "1@c.us"]  # new chats first


def test_rows_carry_the_run_id_they_are_written_under() -> None:
    plan = plan_of([record("1@c.us")], [])
    assert {r["sync_run_id"] for r in plan.history_rows(77) + plan.event_rows(77)} == {77}
    assert all(r["instance_id"] == IID for r in plan.history_rows(77) + plan.event_rows(77))


def test_a_first_load_expands_to_the_plan_of_an_empty_store() -> None:
    chats = [record(f"{i}@c.us", name=f"c{i}") for i in range(5)]
    load = FirstLoad(IID, NOW, chats)
    expanded = load.expand()
    assert expanded == plan_of(chats, [])
    assert load.counts == expanded.counts and load.counts.inserted == 5


# -- what counts as removed -------------------------------------------------------------------


def test_vanished_chats_only_from_a_complete_list() -> None:
    body = orjson.dumps([{"id": "1@c.us"}, {"id": "2@c.us", "archive": "yes"}])
    decoded = decode_chats(body)
    present = {"1@c.us", "2@c.us", "3@c.us"}
    # the rejected element's id was read: that chat is kept, the missing one removed
    assert vanished_chats(present, decoded, count_limited=False) == {"3@c.us"}
    assert vanished_chats(present, decoded, count_limited=True) == set()
    unreadable = decode_chats(orjson.dumps([{"id": "1@c.us"}, {"name": "no id"}]))
    assert vanished_chats(present, unreadable, count_limited=False) == set()


# -- the guards -------------------------------------------------------------------------------


def instance(confirmations: int = 3, count: int | None = None) -> Instance:
    return instance_at(
        "http://127.0.0.1:9", IID, "0" * 50, mass_removal_confirmations=confirmations, count=count
    )


PRESENT = {f"{i}@c.us" for i in range(10)}


def test_an_empty_list_is_an_anomaly_and_clears_a_pending_streak() -> None:
    v = judge(instance(), received=0, present=PRESENT, vanished=PRESENT, stored=CLEAR)
    assert (v.anomaly, v.save) == (ErrorKind.EMPTY_RESPONSE, None)
    v = judge(instance(), received=0, present=PRESENT, vanished=set(), stored=GuardState("[]", 2))
    assert (v.anomaly, v.save) == (ErrorKind.EMPTY_RESPONSE, CLEAR)


def test_a_removal_up_to_the_threshold_applies() -> None:
    gone = set(sorted(PRESENT)[:5])  # 50 %: not more than the threshold
    v = judge(instance(), received=5, present=PRESENT, vanished=gone, stored=CLEAR)
    assert v.anomaly is None and v.save is None and v.confirmed is None


def test_a_mass_removal_is_held_until_confirmed() -> None:
    gone = set(sorted(PRESENT)[:8])
    stored = CLEAR
    for streak in (1, 2):
        v = judge(instance(), received=2, present=PRESENT, vanished=gone, stored=stored)
        assert v.anomaly == ErrorKind.MASS_REMOVAL and v.save is not None
        assert v.save.streak == streak and f"confirmation {streak}/3" in (v.message or "")
        assert parse_vanished_sample(v.save.sample) == gone
        stored = v.save
    # new chats may arrive meanwhile: still the same chats missing
    v = judge(instance(), received=3, present=PRESENT, vanished=gone, stored=stored)
    assert v.anomaly is None and v.save == CLEAR and "applying" in (v.confirmed or "")


def test_one_missing_chat_coming_back_restarts_the_count() -> None:
    gone = set(sorted(PRESENT)[:8])
    first = judge(instance(), received=2, present=PRESENT, vanished=gone, stored=CLEAR)
    assert first.save is not None
    partial = gone - {sorted(gone)[0]} | {sorted(PRESENT)[9]}  # another partial list
    v = judge(instance(), received=2, present=PRESENT, vanished=partial, stored=first.save)
    assert v.anomaly == ErrorKind.MASS_REMOVAL and v.save is not None and v.save.streak == 1


def test_a_normal_tick_clears_a_pending_streak() -> None:
    v = judge(instance(), received=10, present=PRESENT, vanished=set(), stored=GuardState("[]", 1))
    assert v.anomaly is None and v.save == CLEAR


# -- PostgreSQL's statements as text ----------------------------------------------------------


def test_presence_opens_for_new_and_returning_chats_and_closes_for_removed_ones() -> None:
    plan = plan_of(
        [record("new@c.us"), record("back@c.us"), record("stays@c.us", name="Renamed")],
        [
            Stored("back@c.us", removed_at=NOW - timedelta(days=1)),
            Stored("stays@c.us"),
            Stored("gone@c.us"),
        ],
        vanished=frozenset({"gone@c.us"}),
    )
    assert plan.presence_opens == [PresenceOpen("new@c.us", NOW), PresenceOpen("back@c.us", NOW)]
    assert plan.presence_closes == [PresenceClose("gone@c.us", NOW)]
    assert [r["chat_id"] for r in plan.presence_rows(4)] == ["new@c.us", "back@c.us"]
    assert {r["sync_run_id"] for r in plan.presence_rows(4)} == {4}
    # a list that removes nothing (count-limited, say) closes nothing
    assert plan_of([record("stays@c.us")], [Stored("stays@c.us")]).presence_closes == []
    # a first load: every chat enters the list
    load = FirstLoad(IID, NOW, [record("1@c.us"), record("2@c.us")]).expand()
    assert [p.chat_id for p in load.presence_opens] == ["1@c.us", "2@c.us"]


def placeholders(sql: str) -> int:
    return len(re.findall(r"%s", sql))


def test_a_tick_statement_has_a_parameter_for_every_placeholder_and_ends_with_the_run() -> None:
    plan = plan_of(
        [record("1@c.us", ephemeral_expiration=86400, ephemeral_setting_at=NOW), record("9@c.us")],
        [Stored("1@c.us"), Stored("5@c.us")],
        vanished=frozenset({"5@c.us"}),
    )
    run = {"instance_id": IID, "status": "ok", "id": 7}
    sql, params, tables = pg_sql.tick_statement(plan, 7).with_run(run)
    assert placeholders(sql) == len(params)
    assert sql.startswith("WITH c AS (") and ', s AS (INSERT INTO "sync_runs"' in sql
    assert tables == [
        "chats",
        "chats",
        "chat_ephemeral_history",
        "chat_ephemeral_history",
        "chat_events",
        "chat_presence",  # 5@c.us leaves the list
        "chat_presence",  # 9@c.us enters it
        "sync_runs",
    ]
    # the new periods wait for the closes (one open row per chat is a unique index)
    assert "(SELECT count(*) FROM k) >= 0" in sql
    history = orjson.loads(params[sql[: sql.index("h AS (")].count("%s")])
    assert {r["sync_run_id"] for r in history} == {7}


def test_a_tick_without_closes_does_not_wait_for_them() -> None:
    sql, params, tables = pg_sql.tick_statement(plan_of([record("9@c.us")], []), 1).with_run(
        {"id": 1}
    )
    assert " k AS " not in sql and "FROM k" not in sql and placeholders(sql) == len(params)
    assert tables == [
        "chats",
        "chat_ephemeral_history",
        "chat_events",
        "chat_presence",
        "sync_runs",
    ]


def test_the_first_load_derives_valid_from_with_the_one_rule() -> None:
    load = FirstLoad(IID, NOW, [record("1@c.us")])
    sql, params, tables = pg_sql.first_load_statement(load, 3).with_run({"id": 3})
    assert first_valid_from_sql("ephemeral_setting_at", "%s", "%s") in sql
    assert placeholders(sql) == len(params)
    assert NOW + MAX_CLOCK_SKEW in params
    assert tables == [
        "chats",
        "chat_ephemeral_history",
        "chat_events",
        "chat_presence",
        "sync_runs",
    ]


# -- the hypothesis model, against the plan alone ---------------------------------------------


@dataclass
class MemoryStore:
    """The stored state of one instance, kept in dicts: the plan's writes applied by hand."""

    chats: dict[str, dict[str, Any]] = field(default_factory=dict)
    periods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    presence: dict[str, list[list[datetime | None]]] = field(default_factory=dict)
    guard: GuardState = CLEAR

    def stored(self, chat_id: str) -> Stored:
        row = self.chats[chat_id]
        open_ = [p for p in self.periods[chat_id] if p["valid_to"] is None]
        return Stored(
            chat_id,
            row["chat_type"],
            row["name"],
            row["archived"],
            row["ephemeral_expiration"],
            row["ephemeral_setting_at"],
            row["removed_at"],
            open_[0]["valid_from"] if open_ else None,
        )

    def apply(self, plan: TickPlan) -> None:
        for row in plan.chat_rows:
            kept = self.chats.get(row["chat_id"], {}).get("first_seen_at", row["first_seen_at"])
            self.chats[row["chat_id"]] = row | {"first_seen_at": kept}
        for cid in plan.removed:
            self.chats[cid]["removed_at"] = plan.now
        for close in plan.closes:
            [open_] = [p for p in self.periods[close.chat_id] if p["valid_to"] is None]
            open_["valid_to"] = close.valid_to
        for h in plan.history_rows(0):
            assert not any(p["valid_to"] is None for p in self.periods.get(h["chat_id"], []))
            self.periods.setdefault(h["chat_id"], []).append(h)
        for pc in plan.presence_closes:
            assert self.presence[pc.chat_id][-1][1] is None, pc
            self.presence[pc.chat_id][-1][1] = pc.valid_to
        for po in plan.presence_opens:
            periods = self.presence.setdefault(po.chat_id, [])
            assert not periods or periods[-1][1] is not None, po
            periods.append([po.valid_from, None])


def tick(store: MemoryStore, inst: Instance, body: bytes, now: datetime) -> dict[str, Any]:
    """One tick through the guards and the plan, as the syncer runs it (every decoded chat
    a candidate: no snapshot)."""
    decoded = decode_chats(body)
    present = {cid for cid, r in store.chats.items() if r["removed_at"] is None}
    vanished = vanished_chats(present, decoded, count_limited=inst.count is not None)
    out = {"chats_received": decoded.received, "chats_rejected": len(decoded.rejected)}
    if inst.count is None and all(r.chat_id for r in decoded.rejected):
        # no aliases here and no checkWhatsapp to ask: an id switch can only be held
        switch = find_switch(
            decoded,
            present=present,
            in_table=store.chats,
            identity=Identity(),
            answers={},
            threshold=0.5,
        )
        if judge_switch(switch, threshold=0.5, failure="no linking") is not None:
            zero = dict.fromkeys(("inserted", "updated", "removed", "ephemeral_changes"), 0)
            return out | {"status": "anomaly", "error_kind": "id_switch"} | zero
    verdict = judge(
        inst, received=decoded.received, present=present, vanished=vanished, stored=store.guard
    )
    if verdict.save is not None:
        store.guard = verdict.save
    if verdict.anomaly is not None:
        zero = dict.fromkeys(("inserted", "updated", "removed", "ephemeral_changes"), 0)
        return out | {"status": "anomaly", "error_kind": str(verdict.anomaly)} | zero
    plan = plan_tick(
        instance_id=IID,
        candidates=decoded.chats,
        stored={
            c.chat_id: store.stored(c.chat_id) for c in decoded.chats if c.chat_id in store.chats
        },
        in_table=store.chats,
        vanished=vanished,
        now=now,
    )
    store.apply(plan)
    c = plan.counts
    return out | {
        "status": "ok",
        "error_kind": None,
        "inserted": c.inserted,
        "updated": c.updated,
        "removed": c.removed,
        "ephemeral_changes": c.ephemeral_changes,
    }


def check_periods(store: MemoryStore, now: datetime) -> None:
    """One open period per chat, equal to its setting; closed ones chain without gap or
    overlap; none starts beyond the skew."""
    for cid, periods in store.periods.items():
        assert [p["valid_to"] for p in periods].count(None) == 1, cid
        for a, b in zip(periods, periods[1:], strict=False):
            assert a["valid_to"] == b["valid_from"] and a["valid_from"] < a["valid_to"], cid
        last, row = periods[-1], store.chats[cid]
        assert last["valid_to"] is None
        assert (last["ephemeral_expiration"], last["ephemeral_setting_at"]) == (
            row["ephemeral_expiration"],
            row["ephemeral_setting_at"],
        )
        assert all(p["valid_from"] <= now + MAX_CLOCK_SKEW for p in periods)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    steps=STEPS,
    complete_lists=st.sampled_from([True, True, False]),
    confirmations=st.sampled_from([1, 2, 3]),
)
def test_the_model_agrees_with_the_plan(
    steps: list[Step], complete_lists: bool, confirmations: int
) -> None:
    inst = instance(confirmations=confirmations, count=None if complete_lists else 50)
    model = Model(threshold=0.5, confirmations=confirmations, complete_lists=complete_lists)
    store, now = MemoryStore(), datetime(2026, 6, 1, tzinfo=UTC)
    for step in steps:
        now += timedelta(seconds=step.advance)
        body = _render(step.elements, now)
        expected = model.apply(body, now)
        got = tick(store, inst, body, now)
        want = {k.removeprefix("chats_"): v for k, v in expected.items()}
        assert {k.removeprefix("chats_"): v for k, v in got.items()} == want, body
        assert set(store.chats) == set(model.chats), body
        for cid, m in model.chats.items():
            r = store.chats[cid]
            assert (r["name"], r["chat_type"], r["archived"]) == (m.name, m.chat_type, m.archived)
            assert (r["ephemeral_expiration"], r["ephemeral_setting_at"]) == (
                m.expiration,
                m.setting_at,
            )
            assert (r["removed_at"] is not None) == m.removed, body
        assert store.presence == model.presence, body
        check_periods(store, now)

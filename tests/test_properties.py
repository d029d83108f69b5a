"""Property-based tests (hypothesis): random sequences of getChats snapshots applied through
the real ``Syncer`` to a real database, SQLite and PostgreSQL.

Snapshots have chats appearing, vanishing and coming back, renamed, archived, ephemeral
settings changing back and forth, setting timestamps in the past, in the future (within and
beyond the clock-skew allowance), repeated and out of order, duplicate ids (also after
normalisation), and malformed elements. The clock advances by 0 s to an hour between ticks,
and the process is sometimes "restarted" (a fresh ``Syncer``, so no cached state: it starts
from the persisted snapshot, written every tick with ``compact_snapshots``, every few ticks
(``persist_every``: a stale one is topped up from the rows written since) or by the old
process as it stopped, or from the rows when that snapshot is gone or unreadable).

After every tick, against a model of the documented semantics:

* exactly one open history row per chat; closed rows chain without gap or overlap and never
  go backwards; the open row equals the chat's current setting (``check_history_invariants``);
* a new period never starts before the previous one, nor more than the skew ahead;
* ``chats`` equals the last accepted snapshot, vanished chats with ``removed_at``;
* ``chat_presence`` holds, per chat, exactly the periods the model saw it in the applied
  lists: opened at the tick that first (or again) saw it, closed at the tick that removed it
  (anomalies and incomplete lists change nothing);
* the ``sync_runs`` row has the model's status and counts, and every run's counts match the
  rows it wrote (``check_runs_consistent``).

The decoder fuzz (any bytes in: a result or ``PayloadError``, nothing else) is in
tests/test_payload.py.

Runs derandomized with a fixed number of examples so CI is stable; set
``ETL_HYPOTHESIS_EXAMPLES`` to run more and ``ETL_HYPOTHESIS_RANDOM=1`` for fresh seeds.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Table, delete, select, update

from etl.client import FetchResult
from etl.config import Instance
from etl.models import presence_t, snapshots_t
from etl.payload import decode_chats
from etl.sync import MAX_CLOCK_SKEW, Syncer, chats_t, history_t, register_instances, runs_t
from tests.conftest import make_instance
from tests.factories import check_history_invariants
from tests.test_faults import check_runs_consistent

EXAMPLES = int(os.environ.get("ETL_HYPOTHESIS_EXAMPLES", "60"))
T0 = datetime(2026, 6, 1, tzinfo=UTC)
_T0 = int(T0.timestamp())

# -- strategies ------------------------------------------------------------------------------

IDS = ["1@c.us", "2@c.us", "3@c.us", "4@c.us", "5-1479621234@g.us", "6@lid", "7@newsletter"]
RAW_IDS = st.sampled_from(IDS) | st.sampled_from(["1", " 2 ", 3])  # 1 -> "1@c.us" etc.

# a setting timestamp: fixed instants (repeated, out of order across ticks) or relative to
# the tick's clock (past, now, within the 5-minute skew, beyond it); 0 means "never set"
STAMPS = st.sampled_from(
    [
        ("abs", 0),
        ("abs", _T0 - 90 * 86400),
        ("abs", _T0 - 3600),
        ("abs", _T0 + 7200),
        ("rel", -86400),
        ("rel", -1),
        ("rel", 0),
        ("rel", 120),
        ("rel", 3600),
    ]
)
MISSING: Any = object()


@st.composite
def random_chat(draw: st.DrawFn) -> dict[str, Any]:
    """Any well-formed element: every field optional, timestamps from ``STAMPS``."""
    item: dict[str, Any] = {"id": draw(RAW_IDS)}
    item["name"] = draw(
        st.sampled_from(
            # the last ones: JSON escapes in the one-statement write (rows as one JSON
            # parameter) and element boundaries inside a string (the raw-element split)
            ["", "Ann", "Bob", "Маша 🌸", "a\x00b", MISSING, 'q"t\\', "},{", '},{"id":"1"}']
        )
    )
    item["type"] = draw(st.sampled_from(["user", "group", "newsletter", MISSING]))
    item["archive"] = draw(st.sampled_from([False, True, MISSING]))
    expiration = draw(st.sampled_from([0, 86400, 604800, 7776000, MISSING]))
    item["ephemeralExpiration"] = expiration
    item["ephemeralSettingTimestamp"] = MISSING if expiration is MISSING else draw(STAMPS)
    return {k: v for k, v in item.items() if v is not MISSING}


def canonical(chat_id: str) -> dict[str, Any]:
    """How a chat usually looks, so that chats come back unchanged after vanishing."""
    return {"id": chat_id, "name": f"chat {chat_id}", "archive": False, "type": "user"}


EDITS = st.sampled_from(
    [
        {},
        {},
        {},
        {"name": "renamed"},
        {"archive": True},
        {"ephemeralExpiration": 86400, "ephemeralSettingTimestamp": ("abs", _T0 - 3600)},
        {"ephemeralExpiration": 86400, "ephemeralSettingTimestamp": ("rel", -1)},
        {"ephemeralExpiration": 604800, "ephemeralSettingTimestamp": ("rel", 120)},
        {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": ("abs", 0)},
    ]
)

MALFORMED = st.sampled_from(
    [
        1,
        "x",
        None,
        [],
        {},  # no id: not identifiable, so the list is not complete
        {"id": ""},
        {"id": "1@c.us", "name": 5},  # identifiable: protects 1@c.us from removal
        {"id": "2@c.us", "archive": "yes"},
        {"id": "3@c.us", "ephemeralExpiration": -1},
        {"id": "4@c.us", "ephemeralExpiration": "86400"},
    ]
)


@dataclass
class Step:
    elements: list[Any]
    advance: int
    restart: bool
    #: at a restart, what happened to the persisted snapshot meanwhile: nothing (the new
    #: process starts from it), or it is gone, or unreadable (the rows must be read)
    damage: str | None = None
    #: at a restart, the old process stopped cleanly: it wrote the snapshots it kept and
    #: had not written (``persist_on_release``), before any damage
    graceful: bool = False


@st.composite
def snapshot(draw: st.DrawFn) -> list[Any]:
    """Some of the usual chats (each perhaps edited), in any order, plus occasional odd,
    duplicate or malformed elements."""
    present = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)))
    elements: list[Any] = [canonical(cid) | draw(EDITS) for cid in present]
    extras = draw(st.lists(st.one_of(random_chat(), MALFORMED), max_size=2))
    for extra in extras:
        elements.insert(draw(st.integers(0, len(elements))), extra)
    return elements


STEPS = st.lists(
    st.builds(
        Step,
        elements=snapshot(),
        advance=st.sampled_from([0, 1, 60, 3600]),
        restart=st.sampled_from([False, False, False, True]),
        damage=st.sampled_from([None, None, "missing", "corrupt"]),
        graceful=st.booleans(),
    ),
    min_size=1,
    max_size=8,
)

# -- the model ---------------------------------------------------------------------------------


@dataclass
class ModelChat:
    name: str
    chat_type: str
    archived: bool
    expiration: int
    setting_at: datetime | None
    removed: bool = False


@dataclass
class Model:
    threshold: float
    confirmations: int
    complete_lists: bool
    chats: dict[str, ModelChat] = field(default_factory=dict)
    pending: frozenset[str] | None = None
    streak: int = 0
    #: chat -> its presence periods [valid_from, valid_to or None], oldest first
    presence: dict[str, list[list[datetime | None]]] = field(default_factory=dict)

    def _id_switch(self, new: set[str], present: set[str], vanished: set[str]) -> bool:
        """Chats of one id form vanished while chats of the other appeared, more than the
        threshold of the person chats (both forms), and no link can be had (the stub
        client cannot ask checkWhatsapp): held as an id switch."""
        persons = sum(c.endswith(("@c.us", "@lid")) for c in present)
        for old, other in (("@c.us", "@lid"), ("@lid", "@c.us")):
            gone = [c for c in vanished if c.endswith(old)]
            if (
                gone
                and any(n.endswith(other) for n in new)
                and len(gone) / persons > self.threshold
            ):
                return True
        return False

    def apply(self, body: bytes, now: datetime = T0) -> dict[str, Any]:
        """What the tick must record: status, error_kind and counts (the spec, not the code);
        ``now`` is the tick's clock, when presence periods open and close."""
        dec = decode_chats(body)
        out: dict[str, Any] = {
            "status": "ok",
            "error_kind": None,
            "chats_received": dec.received,
            "chats_rejected": len(dec.rejected),
            "chats_inserted": 0,
            "chats_updated": 0,
            "chats_removed": 0,
            "ephemeral_changes": 0,
        }
        if dec.received == 0:
            self.pending, self.streak = None, 0
            return out | {"status": "anomaly", "error_kind": "empty_response"}
        incoming = {c.chat_id: c for c in dec.chats}
        present = {cid for cid, c in self.chats.items() if not c.removed}
        complete = self.complete_lists and all(r.chat_id for r in dec.rejected)
        protected = {r.chat_id for r in dec.rejected if r.chat_id}
        vanished = (present - incoming.keys() - protected) if complete else set()
        if self._id_switch(incoming.keys() - self.chats.keys(), present, vanished):
            return out | {"status": "anomaly", "error_kind": "id_switch"}
        if present and len(vanished) / len(present) > self.threshold:
            # confirmed once the chats missing last time are still all missing (the pool is
            # small, so the code's sample of the missing ids is the whole set here)
            missing = frozenset(vanished)
            still = self.pending is not None and self.pending <= missing
            streak = self.streak + 1 if still else 1
            if streak < self.confirmations:
                self.pending, self.streak = missing, streak
                return out | {"status": "anomaly", "error_kind": "mass_removal"}
        self.pending, self.streak = None, 0
        for c in dec.chats:
            old = self.chats.get(c.chat_id)
            if old is None:
                self.chats[c.chat_id] = ModelChat(
                    c.name,
                    c.chat_type,
                    c.archived,
                    c.ephemeral_expiration if c.ephemeral_known else 0,  # type: ignore[arg-type]
                    c.ephemeral_setting_at if c.ephemeral_known else None,
                )
                self.presence[c.chat_id] = [[now, None]]
                out["chats_inserted"] += 1
                continue
            eph = c.ephemeral_known and (
                (c.ephemeral_expiration, c.ephemeral_setting_at) != (old.expiration, old.setting_at)
            )
            # an empty name or an unsaid flag keeps the stored one (no flickering renames)
            name = c.name or old.name
            archived = c.archived if c.archive_known else old.archived
            attrs = (name, c.chat_type, archived) != (old.name, old.chat_type, old.archived)
            if eph or old.removed or attrs:
                out["chats_updated"] += 1
            out["ephemeral_changes"] += eph
            if old.removed:  # back in the list
                self.presence[c.chat_id].append([now, None])
            old.name, old.chat_type, old.archived = name, c.chat_type, archived
            old.removed = False
            if c.ephemeral_known:
                old.expiration = c.ephemeral_expiration  # type: ignore[assignment]
                old.setting_at = c.ephemeral_setting_at
        for cid in vanished:
            self.chats[cid].removed = True
            self.presence[cid][-1][1] = now
        out["chats_removed"] = len(vanished)
        return out


# -- plumbing ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class StubClient:
    """Serves the step's body as a 200 (HTTP is covered by test_faults and test_client)."""

    def __init__(self) -> None:
        self.body = b"[]"

    def get_chats(self, instance: Instance, *, budget_seconds: float | None = None) -> FetchResult:
        return FetchResult(body=self.body, http_status=200, attempts=1)

    def interrupt(self) -> None:
        pass


def _render(elements: list[Any], now: datetime) -> bytes:
    def stamp(value: Any) -> Any:
        if isinstance(value, tuple):
            kind, n = value
            return n if kind == "abs" else max(0, int(now.timestamp()) + n)
        return value

    out = []
    for e in elements:
        if isinstance(e, dict) and "ephemeralSettingTimestamp" in e:
            e = {**e, "ephemeralSettingTimestamp": stamp(e["ephemeralSettingTimestamp"])}
        out.append(e)
    return orjson.dumps(out)


_ids = itertools.count(2_000_000_001)


def _damage_snapshot(engine: Engine, iid: int, how: str | None) -> None:
    """The persisted snapshot a restarted process finds: as left, gone, or unreadable."""
    if how is None:
        return
    with engine.begin() as conn:
        if how == "missing":
            conn.execute(delete(snapshots_t).where(snapshots_t.c.instance_id == iid))
        else:
            conn.execute(
                update(snapshots_t)
                .where(snapshots_t.c.instance_id == iid)
                .values(data=b"CSS1 not a snapshot")
            )


PROFILE = settings(
    max_examples=EXAMPLES,
    derandomize=os.environ.get("ETL_HYPOTHESIS_RANDOM") != "1",
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # each example uses an instance of its own
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@PROFILE
@given(
    steps=STEPS,
    complete_lists=st.sampled_from([True, True, False]),
    confirmations=st.sampled_from([1, 2, 3]),
    compact=st.booleans(),
    persist_every=st.sampled_from([2, 3]),
)
def test_random_snapshot_sequences_keep_every_invariant(
    engine: Engine,
    steps: list[Step],
    complete_lists: bool,
    confirmations: int,
    compact: bool,
    persist_every: int,
) -> None:
    iid = next(_ids)
    inst = make_instance(
        _FakeSim(),
        iid,
        count=None if complete_lists else 50,
        mass_removal_threshold=0.5,
        mass_removal_confirmations=confirmations,
    )
    register_instances(engine, [inst])
    model = Model(threshold=0.5, confirmations=confirmations, complete_lists=complete_lists)
    clock, client = Clock(), StubClient()
    # compact: snapshots packed and persisted each tick; else written every few ticks
    # (persist_every) and by a graceful stop; either damaged at the restarts
    kinds = {"compact_snapshots": compact, "persist_every": persist_every}
    syncer = Syncer(engine, client, clock=clock, **kinds)  # type: ignore[arg-type]
    history_before: dict[int, Any] = {}
    for n, step in enumerate(steps):
        clock.now += timedelta(seconds=step.advance)
        if step.restart:
            if step.graceful:
                syncer.persist_held()
            _damage_snapshot(engine, iid, step.damage)
            syncer = Syncer(engine, client, clock=clock, **kinds)  # type: ignore[arg-type]
        client.body = _render(step.elements, clock.now)
        expected = model.apply(client.body, clock.now)
        out = syncer.sync(inst)
        where = f"step {n}: {client.body!r}"
        run = _select(engine, runs_t, runs_t.c.id == out.sync_run_id)[0]
        got = {k: getattr(run, k) for k in expected}
        assert got == expected, where

        stored = {r.chat_id: r for r in _select(engine, chats_t, chats_t.c.instance_id == iid)}
        assert set(stored) == set(model.chats), where
        for cid, m in model.chats.items():
            r = stored[cid]
            assert (r.name, r.chat_type, bool(r.archived)) == (m.name, m.chat_type, m.archived)
            assert (r.ephemeral_expiration, r.ephemeral_setting_at) == (
                m.expiration,
                m.setting_at,
            ), where
            assert (r.removed_at is not None) == m.removed, where

        history = {h.id: h for h in _select(engine, history_t, history_t.c.instance_id == iid)}
        for hid, old in history_before.items():  # the past is never rewritten
            new = history[hid]
            assert (new.valid_from, new.ephemeral_expiration) == (
                old.valid_from,
                old.ephemeral_expiration,
            ), where
            assert old.valid_to is None or new.valid_to == old.valid_to, where
        for hid, h in history.items():
            if hid not in history_before:
                assert h.sync_run_id == out.sync_run_id, where
                assert h.valid_from <= clock.now + MAX_CLOCK_SKEW, where
        history_before = history
        presence: dict[str, list[list[datetime | None]]] = {}
        for p in sorted(
            _select(engine, presence_t, presence_t.c.instance_id == iid), key=lambda p: p.id
        ):
            presence.setdefault(p.chat_id, []).append([p.valid_from, p.valid_to])
        assert presence == model.presence, where
        check_history_invariants(engine)
    check_runs_consistent(engine)


def _select(engine: Engine, table: Table, where: Any) -> list[Any]:
    """Typed rows (aware datetimes on both backends)."""
    with engine.connect() as conn:
        return list(conn.execute(select(table).where(where)))


class _FakeSim:
    """Enough of a Simulator for ``make_instance`` (the stub client never calls it)."""

    url = "http://127.0.0.1:9"
    instance_ids: list[int] = []

    def token_for(self, iid: int) -> str:  # pragma: no cover - ids are never simulated
        return "0" * 50


@pytest.mark.parametrize(
    "elements",
    [
        [{"id": "1@c.us", "ephemeralExpiration": 86400, "ephemeralSettingTimestamp": _T0}],
        [{"id": "1"}, {"id": "1@c.us", "name": "dup"}],
    ],
)
def test_model_agrees_with_a_known_case(elements: list[Any]) -> None:
    """The model itself, on two hand-checked inputs (a guard against a model that agrees
    with the code by being wrong in the same way)."""
    model = Model(threshold=0.5, confirmations=3, complete_lists=True)
    out = model.apply(orjson.dumps(elements))
    assert out["status"] == "ok" and out["chats_inserted"] == 1
    only = model.chats["1@c.us"]
    if len(elements) == 2:
        assert out["chats_rejected"] == 1 and only.name == ""
    else:
        assert (only.expiration, only.setting_at) == (86400, T0)

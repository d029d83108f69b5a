"""The plan of one tick: the decoded list and the stored state in, the writes out.

No I/O and no dialect: ``plan_tick`` compares the chats that may have changed with their
stored rows and says which ``chats`` rows to insert or upsert, which chats to mark
removed, which history periods to close and open, which events to record, and the counts
of the ``sync_runs`` row. The stores (``etl.sync.store``) turn a plan into SQL.

The rules, for one chat of the list:

* not stored: a new chat (``created``), its first history period opens;
* stored: written again when any stored attribute changed or it was marked removed
  (``reappeared``, ``renamed``, ``archived``/``unarchived``);
* the ephemeral setting changed (the timer or its timestamp): the open period closes and
  a new one opens at ``choose_valid_from`` (``ephemeral_changed``); an element without
  the ephemeral fields keeps the stored setting;
* a stored chat missing from a complete list: marked removed (``removed``); its history
  stays open (the setting was last seen that way);
* presence: a chat that enters the list (new, or back from removal) opens a presence
  period at the tick's clock; a chat marked removed closes its period then. A list that
  removes nothing (``count``-limited, or with an unidentifiable element) closes none, and
  an anomaly is never planned at all.
* an element that does not say a chat's name (``""``) or archive flag keeps the stored
  one: a name that comes and goes is not a rename each time;
* a platform without disappearing messages (Telegram, MAX) gets no history periods;
* a chat seen under another id (``etl.sync.identity``): an ``id_changed`` event, and the
  id in use recorded (``IdChange``).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from etl.payload import ChatRecord, DecodedChats
from etl.sync.rules import choose_valid_from


class StoredChat(Protocol):
    """A stored ``chats`` row as a tick compares it, with its open period's start."""

    @property
    def chat_id(self) -> str: ...
    @property
    def chat_type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def archived(self) -> bool: ...
    @property
    def ephemeral_expiration(self) -> int: ...
    @property
    def ephemeral_setting_at(self) -> datetime | None: ...
    @property
    def removed_at(self) -> datetime | None: ...
    @property
    def open_from(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class Event:
    """A ``chat_events`` row before it has a run id."""

    chat_id: str
    event_type: str
    old_value: str | None
    new_value: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class HistoryOpen:
    """A new open ``chat_ephemeral_history`` period."""

    chat_id: str
    ephemeral_expiration: int
    ephemeral_setting_at: datetime | None
    valid_from: datetime


@dataclass(frozen=True, slots=True)
class HistoryClose:
    """The end of a chat's open period."""

    chat_id: str
    valid_to: datetime


@dataclass(frozen=True, slots=True)
class PresenceOpen:
    """A chat entering the list: a new open ``chat_presence`` period (the stores never let
    it start before the chat's previous period ended)."""

    chat_id: str
    valid_from: datetime


@dataclass(frozen=True, slots=True)
class PresenceClose:
    """A chat leaving the list: the end of its open presence period (never before its
    start)."""

    chat_id: str
    valid_to: datetime


@dataclass(frozen=True, slots=True)
class IdChange:
    """A chat the API now names by another id: ``chats.current_chat_id`` becomes
    ``new_id`` (NULL when it is the chat's own id again)."""

    chat_id: str
    old_id: str
    new_id: str


@dataclass(frozen=True, slots=True)
class Counts:
    """The counts a tick records in ``sync_runs``."""

    inserted: int = 0
    updated: int = 0
    removed: int = 0
    ephemeral_changes: int = 0
    ids_changed: int = 0


@dataclass(slots=True)
class TickPlan:
    """Every write of one tick, in the order the stores issue them."""

    instance_id: int
    now: datetime
    #: ``chats`` rows of chats not in the table (the snapshot says so)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    #: ``chats`` rows of chats in the table (changed, back from removal)
    upserts: list[dict[str, Any]] = field(default_factory=list)
    #: chats to mark removed, sorted
    removed: list[str] = field(default_factory=list)
    closes: list[HistoryClose] = field(default_factory=list)
    opens: list[HistoryOpen] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    presence_opens: list[PresenceOpen] = field(default_factory=list)
    presence_closes: list[PresenceClose] = field(default_factory=list)
    #: chats seen under another id than last time (``add_id_changes``)
    id_changes: list[IdChange] = field(default_factory=list)
    inserted: int = 0
    updated: int = 0
    ephemeral_changes: int = 0

    @property
    def counts(self) -> Counts:
        return Counts(
            self.inserted,
            self.updated,
            len(self.removed),
            self.ephemeral_changes,
            len(self.id_changes),
        )

    @property
    def chat_rows(self) -> list[dict[str, Any]]:
        return self.inserts + self.upserts

    def history_rows(self, run_id: int) -> list[dict[str, Any]]:
        return [
            {
                "instance_id": self.instance_id,
                "chat_id": h.chat_id,
                "ephemeral_expiration": h.ephemeral_expiration,
                "ephemeral_setting_at": h.ephemeral_setting_at,
                "valid_from": h.valid_from,
                "valid_to": None,
                "sync_run_id": run_id,
            }
            for h in self.opens
        ]

    def presence_rows(self, run_id: int) -> list[dict[str, Any]]:
        return [
            {
                "instance_id": self.instance_id,
                "chat_id": p.chat_id,
                "valid_from": p.valid_from,
                "valid_to": None,
                "sync_run_id": run_id,
            }
            for p in self.presence_opens
        ]

    def event_rows(self, run_id: int) -> list[dict[str, Any]]:
        return [
            {
                "instance_id": self.instance_id,
                "chat_id": e.chat_id,
                "event_type": e.event_type,
                "old_value": e.old_value,
                "new_value": e.new_value,
                "occurred_at": e.occurred_at,
                "sync_run_id": run_id,
            }
            for e in self.events
        ]


@dataclass(frozen=True, slots=True)
class FirstLoad:
    """The first tick of an instance with no stored chats: every chat is new, so the tick
    is its chats, one open period and one ``created`` event each. A store may write it
    from the chats alone (PostgreSQL derives the rows in the database); ``expand`` gives
    the same writes as an ordinary plan."""

    instance_id: int
    now: datetime
    chats: list[ChatRecord]
    #: whether the chats get their first history period (not on Telegram or MAX)
    history: bool = True

    @property
    def counts(self) -> Counts:
        return Counts(inserted=len(self.chats))

    def expand(self) -> TickPlan:
        return plan_tick(
            instance_id=self.instance_id,
            candidates=self.chats,
            stored={},
            in_table=(),
            vanished=set(),
            now=self.now,
            history=self.history,
        )


def vanished_chats(present: Set[str], decoded: DecodedChats, *, count_limited: bool) -> set[str]:
    """The stored, present chats missing from this list.

    A list is complete unless ``count`` limited it or an element we could not identify
    was rejected (that chat may be one of the "missing" ones); an incomplete list removes
    nothing. A rejected element whose id could be read keeps that chat.
    """
    if count_limited or not all(r.chat_id for r in decoded.rejected):
        return set()
    protected = {r.chat_id for r in decoded.rejected if r.chat_id}
    return set(present - decoded.ids - protected)


def effective_name(chat: ChatRecord, row: StoredChat | None) -> str:
    """The name to store: the element's, unless it is empty and a name is stored."""
    return chat.name or (row.name if row is not None else "")


def effective_archived(chat: ChatRecord, row: StoredChat | None) -> bool:
    """The archive flag to store: the element's, unless it did not say (then the stored
    one; none yet: not archived)."""
    if chat.archive_known or row is None:
        return chat.archived
    return bool(row.archived)


def chat_values(
    instance_id: int, chat: ChatRecord, now: datetime, row: StoredChat | None
) -> dict[str, Any]:
    """The ``chats`` row for ``chat``; a chat sent without the ephemeral fields keeps the
    stored setting (none yet: off), without a name or flag the stored ones."""
    if chat.ephemeral_known:
        expiration, setting_at = chat.ephemeral_expiration, chat.ephemeral_setting_at
    elif row is not None:
        expiration, setting_at = row.ephemeral_expiration, row.ephemeral_setting_at
    else:
        expiration, setting_at = 0, None
    return {
        "instance_id": instance_id,
        "chat_id": chat.chat_id,
        "chat_type": chat.chat_type,
        "name": effective_name(chat, row),
        "archived": effective_archived(chat, row),
        "ephemeral_expiration": expiration,
        "ephemeral_setting_at": setting_at,
        "first_seen_at": now,
        "updated_at": now,
        "removed_at": None,
    }


def ephemeral_changed(chat: ChatRecord, row: StoredChat) -> bool:
    """A new setting event: the timer or its timestamp differs (re-setting the same timer
    is a change too); an element without the ephemeral fields changes nothing."""
    return chat.ephemeral_known and (
        chat.ephemeral_expiration != row.ephemeral_expiration
        or chat.ephemeral_setting_at != row.ephemeral_setting_at
    )


def attribute_events(chat: ChatRecord, row: StoredChat, now: datetime) -> list[Event]:
    """The events of a stored chat seen again: back from removal, renamed, (un)archived."""
    events = []
    if row.removed_at is not None:
        events.append(Event(chat.chat_id, "reappeared", None, None, now))
    name, archived = effective_name(chat, row), effective_archived(chat, row)
    if name != row.name:
        events.append(Event(chat.chat_id, "renamed", row.name, name, now))
    if archived != row.archived:
        kind = "archived" if archived else "unarchived"
        old, new = str(bool(row.archived)).lower(), str(archived).lower()
        events.append(Event(chat.chat_id, kind, old, new, now))
    return events


def _changed(chat: ChatRecord, row: StoredChat, setting_changed: bool) -> bool:
    return (
        setting_changed
        or row.removed_at is not None
        or effective_name(chat, row) != row.name
        or chat.chat_type != row.chat_type
        or effective_archived(chat, row) != row.archived
    )


@dataclass(slots=True)
class _SettingChange:
    chat: ChatRecord
    old_expiration: int
    open_from: datetime | None


def plan_tick(
    *,
    instance_id: int,
    candidates: list[ChatRecord],
    stored: Mapping[str, StoredChat],
    in_table: Container[str],
    vanished: Set[str],
    now: datetime,
    history: bool = True,
) -> TickPlan:
    """The writes of one tick.

    ``candidates``: the decoded chats that may differ from what is stored (the others are
    known to be unchanged); ``stored``: the stored rows of those among them that are in
    the table; ``in_table``: every chat id in the table (removed ones included), so that a
    new chat is known to need an insert rather than an upsert; ``vanished``: the chats to
    mark removed (``vanished_chats``); ``history``: False for a platform without
    disappearing messages (no first periods; its chats never carry the setting).
    """
    plan = TickPlan(instance_id, now)
    new_chats: list[ChatRecord] = []
    changes: list[_SettingChange] = []
    for chat in candidates:
        row = stored.get(chat.chat_id)
        if row is None:
            values = chat_values(instance_id, chat, now, None)
            (plan.upserts if chat.chat_id in in_table else plan.inserts).append(values)
            new_chats.append(chat)
            plan.events.append(Event(chat.chat_id, "created", None, chat.name, now))
            plan.presence_opens.append(PresenceOpen(chat.chat_id, now))
            plan.inserted += 1
            continue
        if row.removed_at is not None:
            plan.presence_opens.append(PresenceOpen(chat.chat_id, now))
        setting_changed = ephemeral_changed(chat, row)
        if _changed(chat, row, setting_changed):
            plan.upserts.append(chat_values(instance_id, chat, now, row))
            plan.updated += 1
            plan.events.extend(attribute_events(chat, row, now))
        if setting_changed:
            changes.append(_SettingChange(chat, row.ephemeral_expiration, row.open_from))
    plan.removed = sorted(vanished)
    plan.events.extend(Event(cid, "removed", None, None, now) for cid in plan.removed)
    plan.presence_closes = [PresenceClose(cid, now) for cid in plan.removed]
    _plan_history(plan, new_chats if history else [], changes)
    return plan


def add_id_changes(plan: TickPlan, changes: list[IdChange]) -> None:
    """The chats of ``plan`` seen under another id: an ``id_changed`` event each (old and
    new id), and the ids for ``chats.current_chat_id``."""
    plan.id_changes.extend(changes)
    plan.events.extend(
        Event(c.chat_id, "id_changed", c.old_id, c.new_id, plan.now) for c in changes
    )


def _plan_history(
    plan: TickPlan, new_chats: list[ChatRecord], changes: list[_SettingChange]
) -> None:
    """First periods for new chats; for changed settings, the close of the open period and
    the next one, with an ``ephemeral_changed`` event at the new period's start."""
    now = plan.now
    for chat in new_chats:
        plan.opens.append(_open(chat, choose_valid_from(chat.ephemeral_setting_at, None, now)))
    starts: list[datetime] = []
    for change in changes:
        chat = change.chat
        valid_from = choose_valid_from(chat.ephemeral_setting_at, change.open_from, now)
        if change.open_from is not None:
            plan.closes.append(HistoryClose(chat.chat_id, valid_from))
        plan.opens.append(_open(chat, valid_from))
        starts.append(valid_from)
    plan.events.extend(
        Event(
            c.chat.chat_id,
            "ephemeral_changed",
            str(c.old_expiration),
            str(c.chat.ephemeral_expiration),
            start,
        )
        for c, start in zip(changes, starts, strict=True)
    )
    plan.ephemeral_changes = len(changes)


def _open(chat: ChatRecord, valid_from: datetime) -> HistoryOpen:
    return HistoryOpen(
        chat.chat_id, chat.ephemeral_expiration or 0, chat.ephemeral_setting_at, valid_from
    )

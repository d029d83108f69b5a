"""The identify step of a tick: the list's ids mapped to the stored chats, and an id switch
linked, held or accepted (the rules: ``etl.sync.identity``; the lookups:
``etl.sync.linking``).

``IdStep`` works for the syncer, on its engine, store, snapshots and linker: before the
write transaction it reads a new instance's snapshot and asks checkWhatsapp what an id
switch needs; in the transaction it judges the switch with the answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.client import BUDGET_SHARE
from etl.config import Instance
from etl.payload import DecodedChats
from etl.redact import redact
from etl.sync.identity import find_switch, judge_switch, translate
from etl.sync.linking import Asked, Linker
from etl.sync.plan import IdChange
from etl.sync.snapshot import Snapshot, SnapshotCache
from etl.sync.store import Store

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")

#: an ``etl ids accept`` not used by a tick within this long lapses
ACCEPTANCE_LAPSES = timedelta(hours=1)


@dataclass(slots=True, eq=False)
class Identified:
    """The list mapped to the stored chats, the id changes and the ids learnt; or why the
    tick is held (an id switch not fully linked)."""

    decoded: DecodedChats
    changes: list[IdChange]
    #: alias -> (chat, source): now; ``late``: for chats this tick creates
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)
    late: dict[str, tuple[str, str]] = field(default_factory=dict)
    hold: str | None = None
    #: the operator accepted an id switch that could not be linked
    accepted: bool = False


def complete(instance: Instance, decoded: DecodedChats) -> bool:
    """Whether the list can say that a chat is gone (no count, no unreadable element)."""
    return instance.count is None and all(r.chat_id for r in decoded.rejected)


def has_new(decoded: DecodedChats, snap: Snapshot) -> bool:
    """Whether the list has a chat the snapshot does not know (only decoded elements can:
    the ones skipped as unchanged are stored chats): without one, no id switch."""
    fingerprints = snap.fingerprints
    return any(c.chat_id not in fingerprints for c in decoded.chats)


def notes_text(decoded: DecodedChats) -> str | None:
    """The fields the decoder did not understand, for an ok run's ``error``."""
    if not decoded.notes:
        return None
    parts = ", ".join(f"{reason} ({n})" for reason, n in sorted(decoded.notes.items()))
    return redact(f"fields not understood (stored values kept): {parts}")[:500]


def _switching(instance: Instance, decoded: DecodedChats, snap: Snapshot) -> bool:
    """Whether an id switch is possible in this list at all (a WhatsApp instance, a
    complete list, a chat the snapshot does not know)."""
    return (
        instance.platform == "whatsapp" and complete(instance, decoded) and has_new(decoded, snap)
    )


class IdStep:
    """The identify step, for one syncer."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        snapshots: SnapshotCache,
        linker: Linker,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.store = store
        self.snapshots = snapshots
        self.linker = linker
        self.clock = clock

    def read_snapshot(self, instance: Instance) -> Snapshot | None:
        """A WhatsApp instance new to this process and not preloaded (``Syncer.preload``):
        its snapshot from the rows, read before the write transaction (not under the
        lock), so that an id switch in its first list can be looked up in this very tick.
        Kept with the version it was read at: the write reuses it unless another writer
        wrote since."""
        if instance.platform != "whatsapp":
            return None
        iid = instance.id_instance
        try:
            with self.engine.connect() as conn:
                version = self.store.state_version(conn, iid)  # first: the rows are newer
                snap = self.store.load_stored(conn, iid)
        except SQLAlchemyError:
            return None  # the write finds out, and records it
        self.snapshots.keep(iid, snap, version)
        return snap

    def ask_links(
        self, instance: Instance, decoded: DecodedChats, snap: Snapshot | None, t0: float
    ) -> Asked:
        """Before the lock: the checkWhatsapp answers an id switch in this list needs,
        judged against this process's snapshot (none: nothing to judge against)."""
        known = self.linker.known(instance.id_instance)
        if snap is None:
            return Asked(known)
        translated, changes = translate(decoded, snap.identity, snap.fingerprints)
        if not _switching(instance, translated, snap):
            return Asked(known)
        switch = find_switch(
            translated,
            present=snap.present(),
            in_table=snap.fingerprints,
            identity=snap.identity,
            answers=known,
            threshold=instance.mass_removal_threshold,
            changes=changes,
        )
        if not switch.to_ask:
            return Asked(known)
        deadline = t0 + instance.interval_seconds * BUDGET_SHARE
        return self.linker.ask(instance, switch.to_ask, deadline)

    def identify(
        self,
        conn: Connection,
        instance: Instance,
        asked: Asked,
        snap: Snapshot,
        present: set[str],
        decoded: DecodedChats,
        changes: list[IdChange],
    ) -> Identified:
        """In the transaction: an id switch in this list, linked where checkWhatsapp
        answered, held while it is not fully linked (``identity.judge_switch``), unless the
        operator accepted it."""
        out = Identified(decoded, changes)
        if not _switching(instance, decoded, snap):
            return out
        switch = find_switch(
            decoded,
            present=present,
            in_table=snap.fingerprints,
            identity=snap.identity,
            answers=asked.answers,
            threshold=instance.mass_removal_threshold,
            changes=changes,
        )
        out.aliases = {a: (c, "checkWhatsapp") for a, c in switch.aliases.items()}
        links = {new: (c, "checkWhatsapp") for c, _, new in switch.links}
        reason = judge_switch(
            switch, threshold=instance.mass_removal_threshold, failure=asked.failure
        )
        if reason is not None:
            since = self.clock() - ACCEPTANCE_LAPSES
            if not self.store.take_switch_acceptance(conn, instance.id_instance, since):
                out.aliases.update(links)  # kept, so that the next ticks need not ask
                out.hold = reason
                return out
            out.accepted = True
            log.warning(
                "instance %s: id switch accepted by the operator: %d ids unlinked are "
                "applied as removals and new chats",
                instance.id_instance,
                switch.unresolved,
            )
        out.decoded, linked = switch.apply(decoded)
        out.changes = [*changes, *linked]
        out.aliases.update(links)
        out.late = {a: (c, "checkWhatsapp") for a, c in switch.late_aliases.items()}
        return out

"""What this process last committed for each instance, as one fingerprint per chat.

A steady fleet changes few chats per tick, so reading every stored chat back each tick
would be most of the database work. Each process keeps, per instance, a fingerprint of
every chat it last committed. The state row's ``version`` (bumped by every applied tick,
under the instance lock) tells whether anybody else wrote since; if so, the snapshot is
rebuilt from the table. Only chats whose fingerprint differs are read back and diffed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from etl.payload import ChatRecord, DecodedChats
from etl.sync.fingerprints import chat_fingerprint, fingerprint, row_fingerprint
from etl.sync.identity import Identity

__all__ = [
    "Snapshot",
    "SnapshotCache",
    "chat_fingerprint",
    "fingerprint",
    "row_fingerprint",
]


@dataclass(slots=True)
class Snapshot:
    """One instance's chats as last committed: a fingerprint per chat, the removed ones."""

    version: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    #: ``DecodedChats.raw_hashes`` of the last list applied: its unchanged elements are
    #: not decoded again
    raw: dict[int, str] = field(default_factory=dict)
    #: the chats' other ids and the ids in use (``etl.sync.identity``)
    identity: Identity = field(default_factory=Identity)

    def add_stored(
        self,
        chat_id: str,
        chat_type: str,
        name: str,
        archived: bool,
        expiration: int,
        setting_at: datetime | None,
        removed_at: datetime | None,
    ) -> None:
        """One stored ``chats`` row, as a snapshot rebuilt from the table sees it."""
        self.fingerprints[chat_id] = fingerprint(chat_type, name, archived, expiration, setting_at)
        if removed_at is not None:
            self.removed.add(chat_id)

    def present(self) -> set[str]:
        """The chats stored and not marked removed."""
        return self.fingerprints.keys() - self.removed

    def candidates(self, decoded: DecodedChats) -> list[ChatRecord]:
        """The decoded chats that may differ from what this snapshot says is stored."""
        fingerprints = self.fingerprints
        return [
            c
            for c in decoded.chats
            if not c.ephemeral_known
            or c.chat_id in self.removed
            or fingerprints.get(c.chat_id) != chat_fingerprint(c)
        ]

    def record_written(
        self, rows: list[dict[str, Any]], removed: list[str], raw: dict[int, str] | None
    ) -> None:
        """After commit: the chat rows a tick wrote, the chats it marked removed."""
        for values in rows:
            self.fingerprints[values["chat_id"]] = row_fingerprint(values)
            self.removed.discard(values["chat_id"])
        self.removed.update(removed)
        self.raw = raw or {}

    def record_first_load(self, chats: list[ChatRecord], raw: dict[int, str] | None) -> None:
        """After commit: the chats a first load inserted."""
        self.fingerprints.update((c.chat_id, chat_fingerprint(c)) for c in chats)
        self.raw = raw or {}


class SnapshotCache:
    """The snapshots of the instances this process syncs, by instance id. One thread at a
    time syncs an instance (``Syncer.sync``), and a dict's get, set and pop are atomic."""

    def __init__(self) -> None:
        self._snapshots: dict[int, Snapshot] = {}

    def get(self, instance_id: int) -> Snapshot | None:
        return self._snapshots.get(instance_id)

    def get_current(self, instance_id: int, version: int) -> Snapshot | None:
        """The snapshot, if nobody else wrote since this process last did: the state's
        ``version`` (just bumped by this tick) is one past the snapshot's."""
        snap = self._snapshots.get(instance_id)
        return snap if snap is not None and snap.version == version - 1 else None

    def keep(self, instance_id: int, snap: Snapshot, version: int) -> None:
        snap.version = version
        self._snapshots[instance_id] = snap

    def forget(self, instance_id: int) -> None:
        self._snapshots.pop(instance_id, None)

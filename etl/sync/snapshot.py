"""What is stored for each instance, as one fingerprint per chat; kept between ticks (as
dicts, or packed), and persisted next to the instance's state.

A steady fleet changes few chats per tick, so reading every stored chat back each tick
would be most of the database work. A snapshot holds, per instance, a fingerprint of every
stored chat, which are marked removed, and a hash of each element of the last list
applied (so unchanged elements are not parsed again, and an unchanged list not even
split). The state row's ``version`` (bumped by every applied tick, under the instance
lock) tells whether anybody else wrote since; if so, the snapshot is rebuilt from the
table. Only chats whose element or fingerprint differs are read back and diffed.

Three forms:

* ``Snapshot``: the form a tick works with (dicts and sets); kept between ticks as it
  is by default (nothing to convert);
* ``PackedSnapshot``: the form kept between ticks with ``compact_snapshots``, a few flat
  arrays (ids joined in one ``bytes``, fingerprints and element hashes in
  ``array('q')``), so that a daemon holding millions of chats keeps tens of bytes per
  chat instead of hundreds;
* its bytes (``to_bytes``), written in the tick's own transaction into
  ``instance_snapshots`` with the version it describes (by every tick of ``etl sync
  --once`` and of the daemon with ``compact_snapshots``; by one tick in
  ``persist_every_ticks`` of the default daemon), so that a new process (the next ``etl sync
  --once``, a restart, a replica taking instances over) reads one value per instance
  instead of every chat row. A stale one (behind the state's version: written some ticks
  ago, or by a replica that died since) is topped up from the rows written after it,
  which its ``change_seq_floor`` bounds (``Snapshot.topped_up``). A missing or unreadable
  one, or a stale one without a floor, is ignored: the snapshot is then rebuilt from the
  rows, as before.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.config import Instance
from etl.payload import DECODER_VERSION, ChatRecord, DecodedChats
from etl.sync.fingerprints import chat_fingerprint, fingerprint, row_fingerprint
from etl.sync.identity import Identity

if TYPE_CHECKING:  # the store builds snapshots: it imports this module
    from etl.sync.store import Store

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")

__all__ = [
    "PackedSnapshot",
    "Snapshot",
    "SnapshotCache",
    "chat_fingerprint",
    "decoder_tag",
    "fingerprint",
    "preload",
    "preload_ahead",
    "row_fingerprint",
]

_SEP = b"\x00"
#: the bytes' layout: magic, then (tag length, body hash, chats, ids length, removed
#: length, extra length, identity length), then those parts
_MAGIC = b"CSS1"
_HEADER = struct.Struct("<IqIIIII")


def decoder_tag(platform: str) -> str:
    """Which decoder the element hashes were judged by: hashes of another one do not say
    that an element decodes as before."""
    return f"{platform}/{DECODER_VERSION}"


def _join(ids: Any) -> bytes:
    # one join and one encode, both in C: a tick packs every chat id of its instance
    return "\x00".join(ids).encode("utf-8", "surrogatepass")


def _int64(values: list[int]) -> array[int]:
    # array.fromlist reads a list in C; array("q", iterable) goes item by item
    out = array("q")
    out.fromlist(values)
    return out


def _split(data: bytes) -> list[str]:
    return data.decode("utf-8", "surrogatepass").split("\x00") if data else []


@dataclass(slots=True)
class Snapshot:
    """One instance's chats as stored: a fingerprint per chat, the removed ones, and the
    element hashes of the last list applied. Made for one tick (``PackedSnapshot.unpack``
    or ``Store.load_snapshot``); never changed once a tick has used it."""

    version: int = 0
    fingerprints: dict[str, int] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    #: ``DecodedChats.raw_hashes`` of the last list applied: its unchanged elements are
    #: not decoded again
    raw: dict[int, str] = field(default_factory=dict)
    #: ``DecodedChats.body_hash`` of the last list applied: the same body is not split
    body_hash: int = 0
    #: the decoder ``raw`` and ``body_hash`` were judged by (``decoder_tag``)
    tag: str = ""
    #: the chats' other ids and the ids in use (``etl.sync.identity``)
    identity: Identity = field(default_factory=Identity)
    #: whether ``instance_snapshots`` holds this very snapshot (at ``version``)
    persisted: bool = False
    #: the packed form it was unpacked from, if any (kept as it is when a tick changes
    #: nothing in it)
    source: PackedSnapshot | None = None

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> Snapshot:
        """A snapshot rebuilt from the table: each row is a stored chat's (chat id, type,
        name, archived, expiration, setting time, removal time), in ``STORED_CHAT``'s
        order. One loop with the rows unpacked in place: a takeover rebuilds 500 an
        instance, and attribute access and a call per row were a third of that."""
        snap = cls()
        fingerprints, removed = snap.fingerprints, snap.removed
        for chat_id, chat_type, name, archived, expiration, setting_at, removed_at in rows:
            fingerprints[chat_id] = fingerprint(chat_type, name, archived, expiration, setting_at)
            if removed_at is not None:
                removed.add(chat_id)
        return snap

    def topped_up(
        self,
        version: int,
        rows: Iterable[Sequence[Any]],
        aliases: Iterable[Sequence[Any]],
    ) -> Snapshot:
        """This (stale) snapshot brought to ``version`` by the rows written since it was
        made: each chat row as ``STORED_CHAT`` with ``current_chat_id`` after it, each
        alias row as (alias id, chat id). Rows written before are harmless (a row's
        current values are always right to apply), but every row written since must be
        among them (``change_seq_floor``).

        The elements of the last list that this snapshot would skip as unchanged are
        forgotten for every chat a row names: the row may have been written by a list
        this process never saw, so an element identical to an older one may no longer
        describe it. The whole body's hash is forgotten too."""
        fingerprints, removed = dict(self.fingerprints), set(self.removed)
        aliases_of, current = dict(self.identity.aliases), dict(self.identity.current)
        touched: set[str] = set()
        for chat_id, chat_type, name, archived, expiration, setting_at, gone, in_use in rows:
            fingerprints[chat_id] = fingerprint(chat_type, name, archived, expiration, setting_at)
            if gone is None:
                removed.discard(chat_id)
            else:
                removed.add(chat_id)
            touched.add(chat_id)
            if in_use is None:
                current.pop(chat_id, None)
            else:
                current[chat_id] = in_use
        for alias_id, chat_id in aliases:
            aliases_of[alias_id] = chat_id
            touched.update((alias_id, chat_id))
        before = self.identity.aliases

        def kept(api_id: str) -> bool:
            return not {api_id, aliases_of.get(api_id), before.get(api_id)} & touched

        return Snapshot(
            version=version,
            fingerprints=fingerprints,
            removed=removed,
            raw={h: api_id for h, api_id in self.raw.items() if kept(api_id)},
            body_hash=0,
            tag=self.tag,
            identity=Identity(aliases_of, current),
        )

    def known_for(self, platform: str) -> tuple[dict[int, str] | None, int]:
        """The element hashes and body hash a decode of ``platform`` may skip against."""
        if self.tag != decoder_tag(platform):
            return None, 0
        return self.raw, self.body_hash

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

    def after_write(
        self,
        rows: list[dict[str, Any]],
        removed: list[str],
        decoded: DecodedChats,
        tag: str,
        identity: Identity,
    ) -> Snapshot:
        """What is stored once a tick's writes commit: the chat rows it wrote, the chats
        it marked removed, its list's element hashes, the ids as it left them."""
        fingerprints = dict(self.fingerprints)
        gone = set(self.removed)
        for values in rows:
            fingerprints[values["chat_id"]] = row_fingerprint(values)
            gone.discard(values["chat_id"])
        gone.update(removed)
        return self._next(fingerprints, gone, decoded, tag, identity)

    def after_first_load(
        self, chats: list[ChatRecord], decoded: DecodedChats, tag: str, identity: Identity
    ) -> Snapshot:
        """What is stored once a first load commits."""
        fingerprints = dict(self.fingerprints)
        fingerprints.update((c.chat_id, chat_fingerprint(c)) for c in chats)
        return self._next(fingerprints, set(self.removed), decoded, tag, identity)

    def _next(
        self,
        fingerprints: dict[str, int],
        removed: set[str],
        decoded: DecodedChats,
        tag: str,
        identity: Identity,
    ) -> Snapshot:
        return Snapshot(
            version=self.version,
            fingerprints=fingerprints,
            removed=removed,
            raw=decoded.raw_hashes or {},
            body_hash=decoded.body_hash,
            tag=tag,
            identity=identity,
        )

    def with_identity(self, identity: Identity) -> Snapshot:
        """This snapshot with other ids (a held tick that kept checkWhatsapp's answers)."""
        if identity is self.identity:
            return self
        return replace(self, identity=identity, persisted=False, source=None)

    def packed(self, identity: Identity | None = None) -> PackedSnapshot:
        """This snapshot as it is (a tick that wrote no chat), with ``identity``."""
        return PackedSnapshot.pack(
            self.fingerprints,
            self.removed,
            self.raw,
            self.body_hash,
            self.tag,
            self.identity if identity is None else identity,
        )


@dataclass(slots=True, eq=False)
class PackedSnapshot:
    """A snapshot between ticks: the ids joined in one ``bytes``, their fingerprints and
    the element hash of each (0: not in the last list) in two ``array('q')``."""

    ids: bytes
    fingerprints: array[int]
    raw: array[int]
    removed: bytes
    body_hash: int
    tag: str
    #: element hashes of ids that are not stored chats' own (aliases in the list)
    extra: dict[int, str]
    identity: Identity

    @classmethod
    def pack(
        cls,
        fingerprints: dict[str, int],
        removed: set[str],
        raw: dict[int, str],
        body_hash: int,
        tag: str,
        identity: Identity,
    ) -> PackedSnapshot:
        # chat -> element hash, built and read with C-level zip/map (no Python loop over
        # the chats): a tick packs its instance's whole snapshot
        element = dict(zip(raw.values(), raw.keys(), strict=True))
        others = element.keys() - fingerprints.keys()
        extra = {h: chat for h, chat in raw.items() if chat in others} if others else {}
        return cls(
            ids=_join(fingerprints),
            fingerprints=_int64(list(fingerprints.values())),
            raw=_int64(list(map(element.get, fingerprints, repeat(0)))),
            removed=_join(sorted(removed)),
            body_hash=body_hash,
            tag=tag,
            extra=extra,
            identity=identity,
        )

    def unpack(self, version: int, *, persisted: bool = False) -> Snapshot:
        ids = _split(self.ids)
        raw = dict(zip(self.raw.tolist(), ids, strict=True))
        raw.pop(0, None)  # 0: the chat was not in the last list
        raw.update(self.extra)
        return Snapshot(
            version=version,
            fingerprints=dict(zip(ids, self.fingerprints.tolist(), strict=True)),
            removed=set(_split(self.removed)),
            raw=raw,
            body_hash=self.body_hash,
            tag=self.tag,
            identity=Identity(dict(self.identity.aliases), dict(self.identity.current)),
            persisted=persisted,
            source=self,
        )

    def nbytes(self) -> int:
        """About how much memory the packed arrays take (for benchmarks)."""
        return len(self.ids) + len(self.removed) + 8 * (len(self.fingerprints) + len(self.raw))

    # -- persisted form ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tag = self.tag.encode()
        extra = (
            json.dumps({str(h): c for h, c in self.extra.items()}).encode() if self.extra else b""
        )
        ident = (
            json.dumps([self.identity.aliases, self.identity.current]).encode()
            if self.identity.aliases or self.identity.current
            else b""
        )
        header = _HEADER.pack(
            len(tag), self.body_hash, len(self.fingerprints), len(self.ids), len(self.removed),
            len(extra), len(ident),
        )  # fmt: skip
        return b"".join(
            (
                _MAGIC,
                header,
                tag,
                self.ids,
                self.fingerprints.tobytes(),
                self.raw.tobytes(),
                self.removed,
                extra,
                ident,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PackedSnapshot:
        """Raises ValueError when ``data`` is not a packed snapshot of this layout."""
        if data[:4] != _MAGIC:
            raise ValueError("not a packed snapshot")
        try:
            n_tag, body, n, n_ids, n_removed, n_extra, n_ident = _HEADER.unpack_from(data, 4)
        except struct.error as exc:
            raise ValueError(f"truncated header: {exc}") from None
        at = 4 + _HEADER.size
        sizes = (n_tag, n_ids, 8 * n, 8 * n, n_removed, n_extra, n_ident)
        if at + sum(sizes) != len(data):
            raise ValueError("the parts do not add up to the data")
        parts = []
        for size in sizes:
            parts.append(data[at : at + size])
            at += size
        tag, ids, fps, raw, removed, extra, ident = parts
        fingerprints, hashes = array("q"), array("q")
        fingerprints.frombytes(fps)
        hashes.frombytes(raw)
        if (ids.count(_SEP) + 1 if ids else 0) != n:
            raise ValueError("the ids do not match the fingerprints")
        aliases, current = json.loads(ident) if ident else ({}, {})
        return cls(
            ids=ids,
            fingerprints=fingerprints,
            raw=hashes,
            removed=removed,
            body_hash=body,
            tag=tag.decode(),
            extra={int(h): c for h, c in json.loads(extra).items()} if extra else {},
            identity=Identity(aliases, current),
        )


@dataclass(slots=True)
class _Entry:
    version: int
    persisted: bool
    #: the packed form (``compact``, or read ahead from ``instance_snapshots``)
    packed: PackedSnapshot | None = None
    #: the unpacked form: the running tick's (``compact``), or kept between ticks
    live: Snapshot | None = None
    #: the ``change_seq_floor`` to persist it with (None: unknown)
    floor: int | None = None
    #: ``instance_snapshots`` holds a snapshot of the instance with a floor, this one or
    #: an older one: a process that reads it tops it up instead of reading every row
    based: bool = False


class SnapshotCache:
    """The snapshots of the instances this process syncs, by instance id. One thread at a
    time syncs an instance (``Syncer.sync``), and a dict's get, set and pop are atomic.

    ``compact``: kept packed between ticks (tens of bytes per chat; each tick unpacks and
    packs its instance's snapshot, which costs CPU); else kept as dicts (a few hundred
    bytes per chat, nothing to convert)."""

    def __init__(self, *, compact: bool = False) -> None:
        self.compact = compact
        self._entries: dict[int, _Entry] = {}
        #: instances whose turn to persist came at a tick that changed nothing
        #: (``Syncer._persists``): the next tick that changes something writes it
        self._owed: set[int] = set()

    def get(self, instance_id: int) -> Snapshot | None:
        """The snapshot for the running tick (unpacked at most once per tick)."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return None
        if entry.live is None:
            assert entry.packed is not None  # an entry holds one form or both
            entry.live = entry.packed.unpack(entry.version, persisted=entry.persisted)
            if not self.compact:
                entry.packed = None  # the dicts are kept: the packed copy is not needed
        return entry.live

    def get_current(self, instance_id: int, version: int) -> Snapshot | None:
        """The snapshot, if nobody else wrote since it was taken: the state's ``version``
        (just bumped by this tick) is one past the snapshot's."""
        entry = self._entries.get(instance_id)
        if entry is None or entry.version != version - 1:
            return None
        return self.get(instance_id)

    def keep(self, instance_id: int, snap: Snapshot, version: int) -> None:
        """A snapshot read from the table (or unchanged), at ``version``."""
        packed = snap.packed() if self.compact else None
        self._entries[instance_id] = _Entry(version, snap.persisted, packed, live=snap)

    def based(self, instance_id: int) -> bool:
        """Whether ``instance_snapshots`` holds a snapshot of the instance that a process
        can top up, as far as this process knows."""
        entry = self._entries.get(instance_id)
        return entry is not None and entry.based

    def keep_after(
        self,
        instance_id: int,
        snap: Snapshot,
        packed: PackedSnapshot | None,
        version: int,
        *,
        persisted: bool,
        floor: int | None = None,
    ) -> None:
        """What a committed tick left stored, at ``version`` (``packed``: its packed form,
        if the tick made one; ``floor``: the tick's ``Locked.floor``)."""
        before = self._entries.get(instance_id)
        based = persisted or (before is not None and before.based)
        if persisted:
            self._owed.discard(instance_id)
        if self.compact:
            packed = packed or snap.packed()
            entry = _Entry(version, persisted, packed, floor=floor, based=based)
        else:
            if snap.persisted != persisted:  # a snapshot is not changed once a tick used it
                snap = replace(snap, persisted=persisted)
            entry = _Entry(version, persisted, live=snap, floor=floor, based=based)
        self._entries[instance_id] = entry

    def adopt(
        self, instance_id: int, packed: PackedSnapshot, version: int, floor: int | None = None
    ) -> None:
        """A persisted snapshot read ahead of the instance's tick, unless the tick (or
        another read) got there first."""
        entry = _Entry(version, True, packed, floor=floor, based=floor is not None)
        self._entries.setdefault(instance_id, entry)

    def adopt_topped_up(self, instance_id: int, snap: Snapshot, floor: int) -> None:
        """A stale persisted snapshot topped up to ``snap.version`` (``Snapshot.topped_up``),
        unless the tick (or another read) got there first. The table still holds the older
        one, which the same ``floor`` serves."""
        packed = snap.packed() if self.compact else None
        entry = _Entry(snap.version, False, packed, snap, floor, based=True)
        self._entries.setdefault(instance_id, entry)

    def __contains__(self, instance_id: int) -> bool:
        return instance_id in self._entries

    def ids(self) -> list[int]:
        """The instances this process keeps a snapshot of."""
        return list(self._entries)

    def unpersisted(self, instance_id: int) -> tuple[int, int | None, PackedSnapshot] | None:
        """The instance's snapshot packed, with its version and floor, when
        ``instance_snapshots`` does not hold it (None: none kept, or persisted already)."""
        entry = self._entries.get(instance_id)
        if entry is None or entry.persisted:
            return None
        if entry.packed is not None:
            return entry.version, entry.floor, entry.packed
        assert entry.live is not None  # an entry holds one form or both
        return entry.version, entry.floor, entry.live.packed()

    def mark_persisted(self, instance_id: int, version: int) -> None:
        """``instance_snapshots`` holds the instance's snapshot at ``version`` (unless a
        tick has moved it on since)."""
        entry = self._entries.get(instance_id)
        if entry is not None and entry.version == version:
            entry.persisted = True
            entry.based = entry.based or entry.floor is not None

    def settle(self, instance_id: int) -> None:
        """The tick is over: ``compact`` keeps only the packed form."""
        entry = self._entries.get(instance_id)
        if self.compact and entry is not None and entry.packed is not None:
            entry.live = None

    def owe(self, instance_id: int) -> None:
        self._owed.add(instance_id)

    def owed(self, instance_id: int) -> bool:
        return instance_id in self._owed

    def forget(self, instance_id: int) -> None:
        self._entries.pop(instance_id, None)
        self._owed.discard(instance_id)

    def packed_bytes(self) -> int:
        """About how much memory the packed snapshots take (for benchmarks)."""
        return sum(e.packed.nbytes() for e in self._entries.values() if e.packed is not None)

    def __len__(self) -> int:
        return len(self._entries)


#: persisted snapshots read per statement (``preload``)
PRELOAD_CHUNK = 500


def preload(
    engine: Engine, store: Store, cache: SnapshotCache, instances: Sequence[Instance]
) -> int:
    """Read the persisted snapshots of the instances ``cache`` has none of, a few
    statements for all of them, so that their first tick in this process costs what a
    steady one does; returns how many were usable. A stale one is topped up from the rows
    written since (``Snapshot.topped_up``). One that is missing or unreadable, or stale
    without a floor, is rebuilt from the rows by the tick, as before."""
    found = 0
    with engine.connect() as conn:
        for start in range(0, len(instances), PRELOAD_CHUNK):
            chunk = instances[start : start + PRELOAD_CHUNK]
            ids = [i.id_instance for i in chunk if i.id_instance not in cache]
            if ids:
                found += _preload_chunk(conn, store, cache, ids)
    return found


def _preload_chunk(conn: Connection, store: Store, cache: SnapshotCache, ids: list[int]) -> int:
    found = 0
    stale: dict[int, tuple[PackedSnapshot, int, int]] = {}
    # the state's version is read first, the rows written since after it: rows newer than
    # that version mean a writer moved the instance on, and its tick then finds the
    # snapshot one version short and reads the rows again under the lock
    for row in store.load_packed(conn, ids):
        try:
            packed = PackedSnapshot.from_bytes(row.data)
        except ValueError as exc:
            log.info("instance %s: persisted snapshot unreadable (%s)", row.instance_id, exc)
            continue
        if row.version == row.state_version:
            cache.adopt(row.instance_id, packed, row.version, row.floor)
            found += 1
        elif row.floor is not None and row.version < row.state_version:
            stale[row.instance_id] = (packed, row.state_version, row.floor)
    if stale:
        rows, aliases = store.load_since(conn, {iid: floor for iid, (_, _, floor) in stale.items()})
        for iid, (packed, version, floor) in stale.items():
            snap = packed.unpack(version).topped_up(
                version, rows.get(iid, ()), aliases.get(iid, ())
            )
            cache.adopt_topped_up(iid, snap, floor)
            found += 1
    return found


def preload_ahead(
    engine: Engine, store: Store, cache: SnapshotCache, instances: Sequence[Instance]
) -> threading.Thread:
    """``preload`` on a thread of its own, in the order given (the order the ticks will
    come in), while the ticks run: a few statements read ahead of them instead of one per
    tick. A tick that gets there first reads its own."""

    def run() -> None:
        try:
            found = preload(engine, store, cache, instances)
        except SQLAlchemyError as exc:
            log.info("could not read the persisted snapshots ahead: %s", type(exc).__name__)
            return
        log.debug("read %d persisted snapshots ahead of their ticks", found)

    thread = threading.Thread(target=run, name="snapshot-preload", daemon=True)
    thread.start()
    return thread

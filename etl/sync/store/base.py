"""The store: every read and write a tick makes, for one database.

One class per database, chosen once from the engine (``store_for``), as Alembic chooses
its ``DefaultImpl`` per dialect. ``Store`` holds what every database shares (SQLAlchemy
Core statements); a subclass adds the instance lock and whatever it writes its own way.
A third database is a new subclass with its ``dialect`` name, not new branches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, NamedTuple, cast

from sqlalchemy import Connection, Table, and_, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import BindParameter

from etl.models import aliases_t, chats_t, history_t, runs_t, snapshots_t, state_t
from etl.sync.guards import GuardState
from etl.sync.identity import Identity
from etl.sync.plan import FirstLoad, IdChange, StoredChat, TickPlan
from etl.sync.snapshot import Snapshot

#: called with (table name, rows) for the rows a combined statement (``WITH ... INSERT``)
#: wrote to each table: its cursor's row count covers only its last part (benchmarks
#: count rows this way)
written_listeners: list[Callable[[str, int], None]] = []

#: the columns a re-seen chat's upsert overwrites (``first_seen_at`` is kept)
UPSERT_UPDATES = (
    "chat_type",
    "name",
    "archived",
    "ephemeral_expiration",
    "ephemeral_setting_at",
    "updated_at",
    "removed_at",
)

#: what a tick compares a chat with (the snapshot's fingerprint and the full diff)
STORED_CHAT = (
    chats_t.c.chat_id,
    chats_t.c.chat_type,
    chats_t.c.name,
    chats_t.c.archived,
    chats_t.c.ephemeral_expiration,
    chats_t.c.ephemeral_setting_at,
    chats_t.c.removed_at,
)

#: the run row's final values, a callable so that the store decides when the tick ends
#: (it stamps ``finished_at`` and ``duration_ms`` each time it is called)
RunRow = Callable[[], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Claim:
    """The lease a tick is made under (several replicas, ``etl.leases``): the replica that
    owns the instance and the instance's fencing epoch when it was claimed. The store
    refuses the tick's writes once the instance's row says otherwise."""

    owner: str
    epoch: int
    #: the longest the tick's transaction may sit idle (its client stalled between two
    #: statements) before the database ends it, releasing its locks so that the new owner
    #: is not held up; 0: no limit
    idle_ms: int = 0


@dataclass(frozen=True, slots=True)
class TickState:
    """What a tick that commits sets in the instance's state row with its lock."""

    #: when the instance's next tick is due
    due: datetime | None = None
    #: the claim the tick's writes are made under (None: one process, unfenced)
    claim: Claim | None = None


@dataclass(frozen=True, slots=True)
class Locked:
    """The instance's lock, held until the transaction ends, and its state just bumped."""

    #: the ``sync_runs.id`` reserved for this tick, or None where the store inserts the run
    #: row first and learns its id then
    run_id: int | None
    #: the state's version after the bump (see ``etl.sync.snapshot``)
    version: int
    guard: GuardState
    #: the stored rows of the ``read_ids`` asked for, when read with the lock
    stored: dict[str, StoredChat] | None = None
    #: the ``change_seq`` this tick writes, where the store numbers writes itself (SQLite);
    #: None where the database does (PostgreSQL: the transaction id)
    change_seq: int | None = None
    #: the tick's claim is no longer held: nothing was bumped, nothing may be written but
    #: the run row (``lease_lost``)
    fenced: bool = False
    #: the ``load_watermark`` seen inside this transaction: any transaction that writes
    #: the instance after this one commits later, so its rows' ``change_seq`` is at least
    #: this (the floor a snapshot of ``version`` is topped up from; None: not read)
    floor: int | None = None


@dataclass(frozen=True, slots=True)
class SnapshotWrite:
    """The persisted snapshot a tick leaves (``etl.sync.snapshot``), written with its other
    writes: ``data`` at ``version``, or (None) the one at the version before, moved on."""

    instance_id: int
    version: int
    data: bytes | None
    now: datetime
    #: ``Locked.floor`` of the tick that left ``version`` (None: unknown)
    floor: int | None = None


class PersistedSnapshot(NamedTuple):
    """A row of ``instance_snapshots`` with its instance's state version."""

    instance_id: int
    version: int
    state_version: int
    floor: int | None
    data: bytes


def fenced_lock(run_id: int | None, change_seq: int | None = None) -> Locked:
    """The ``Locked`` of a tick whose claim is no longer held."""
    return Locked(run_id, 0, GuardState(None, 0), change_seq=change_seq, fenced=True)


class Store:
    """What every database shares; subclasses set ``dialect`` and implement the rest."""

    #: the SQLAlchemy dialect name this store serves
    dialect: ClassVar[str]
    #: whether ``lock`` can read chats in the same round trip (``read_ids``)
    reads_with_lock: ClassVar[bool] = False
    #: chats read back per statement
    read_chunk: ClassVar[int] = 5000
    _by_dialect: ClassVar[dict[str, type[Store]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Store._by_dialect[cls.dialect] = cls

    @classmethod
    def by_dialect(cls) -> dict[str, type[Store]]:
        """Every store class, by the dialect it serves."""
        return dict(Store._by_dialect)

    @staticmethod
    def insert(table: Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that supports ON CONFLICT, in this dialect."""
        raise NotImplementedError

    def __init__(self) -> None:
        # Built once: building and hashing a statement (an upsert with seven ``excluded``
        # columns above all) on every execute would cost more than running it; a
        # prebuilt one reuses its cache key and compiled form.
        bump = self.insert(state_t).values(
            instance_id=bindparam("iid"),
            pending_removal_streak=0,
            updated_at=bindparam("now"),
            version=1,
            next_due_at=bindparam("due"),
        )
        returned = (
            state_t.c.version,
            state_t.c.pending_removal_digest,
            state_t.c.pending_removal_streak,
        )
        version = self.insert(state_t).values(
            instance_id=bindparam("iid"),
            pending_removal_streak=0,
            updated_at=bindparam("now"),
            version=1,
        )
        self.bump_version = version.on_conflict_do_update(
            index_elements=[state_t.c.instance_id],
            set_={"version": state_t.c.version + 1},
        ).returning(*returned)
        # a tick that commits is not a failed one: its bump clears the failures
        self.bump_state = bump.on_conflict_do_update(
            index_elements=[state_t.c.instance_id],
            set_={
                "version": state_t.c.version + 1,
                "next_due_at": bump.excluded.next_due_at,
                "failures": 0,
                "failure_kind": None,
            },
        ).returning(*returned)
        self.bump_fenced = (
            update(state_t)
            .where(
                state_t.c.instance_id == bindparam("iid"),
                state_t.c.lease_owner == bindparam("owner"),
                state_t.c.lease_epoch == bindparam("epoch"),
            )
            .values(
                version=state_t.c.version + 1,
                next_due_at=bindparam("due"),
                failures=0,
                failure_kind=None,
            )
            .returning(*returned)
        )
        upsert = self.insert(chats_t)
        self.upsert_chats = upsert.on_conflict_do_update(
            index_elements=[chats_t.c.instance_id, chats_t.c.chat_id],
            # the row's new change_seq too: an incremental load must see it again
            set_={c: upsert.excluded[c] for c in (*UPSERT_UPDATES, "change_seq")},
        )
        self.load_rows_stmt = (
            select(*STORED_CHAT, history_t.c.valid_from.label("open_from"))
            .select_from(
                chats_t.outerjoin(
                    history_t,
                    and_(
                        history_t.c.instance_id == chats_t.c.instance_id,
                        history_t.c.chat_id == chats_t.c.chat_id,
                        history_t.c.valid_to.is_(None),
                    ),
                )
            )
            .where(
                chats_t.c.instance_id == bindparam("iid"),
                chats_t.c.chat_id.in_(bindparam("ids", expanding=True)),
            )
        )
        self.insert_run = insert(runs_t).returning(runs_t.c.id)
        snapshot = self.insert(snapshots_t)
        #: never over a newer one: a tick's is always the newest (its version was just
        #: bumped under the lock), one written apart from a tick (``Syncer.persist_held``)
        #: may not be
        self.upsert_snapshot = snapshot.on_conflict_do_update(
            index_elements=[snapshots_t.c.instance_id],
            set_={
                c: snapshot.excluded[c]
                for c in ("version", "data", "updated_at", "change_seq_floor")
            },
            where=snapshots_t.c.version < snapshot.excluded.version,
        )
        self.bump_snapshot = (
            update(snapshots_t)
            .where(
                snapshots_t.c.instance_id == bindparam("iid"),
                snapshots_t.c.version == bindparam("version") - 1,
            )
            .values(version=bindparam("version"))
        )
        since: BindParameter[int] = bindparam("floor")
        self.chats_since = select(*STORED_CHAT, chats_t.c.current_chat_id).where(
            chats_t.c.instance_id == bindparam("iid"), chats_t.c.change_seq >= since
        )
        self.aliases_since = select(aliases_t.c.alias_id, aliases_t.c.chat_id).where(
            aliases_t.c.instance_id == bindparam("iid"), aliases_t.c.change_seq >= since
        )
        alias = self.insert(aliases_t)
        self.upsert_aliases = alias.on_conflict_do_update(
            index_elements=[aliases_t.c.instance_id, aliases_t.c.alias_id],
            set_={c: alias.excluded[c] for c in ("chat_id", "source", "linked_at", "change_seq")},
        )
        self.set_current_id = (
            update(chats_t)
            .where(
                chats_t.c.instance_id == bindparam("b_iid"),
                chats_t.c.chat_id == bindparam("b_chat_id"),
            )
            .values(
                current_chat_id=bindparam("b_current"),
                updated_at=bindparam("b_now"),
            )
        )

    # -- the instance's lock and state --------------------------------------------------

    def lock(
        self,
        conn: Connection,
        iid: int,
        now: datetime,
        read_ids: list[str] | None,
        state: TickState | None,
    ) -> Locked:
        """Serialise the writers of one instance across processes until the transaction
        ends, and bump its state version (creating the row when unfenced) with a tick's
        ``state`` (None: not a tick, the version only). With ``read_ids`` (where
        ``reads_with_lock``), also read those chats' stored rows. ``Locked.fenced`` when
        ``state.claim`` is no longer held."""
        raise NotImplementedError

    def bump(
        self, conn: Connection, iid: int, now: datetime, state: TickState | None
    ) -> tuple[int, GuardState] | None:
        """Bump the instance's state version (with a tick's ``state``, or alone); return it
        with the stored guard state, or None when the tick's claim is no longer held
        (nothing was changed)."""
        params: dict[str, Any] = {"iid": iid, "now": now}
        if state is None:
            row = conn.execute(self.bump_version, params).one()
        elif state.claim is None:
            row = conn.execute(self.bump_state, {**params, "due": state.due}).one()
        else:
            claim = {"owner": state.claim.owner, "epoch": state.claim.epoch}
            found = conn.execute(self.bump_fenced, {**params, "due": state.due, **claim}).first()
            if found is None:
                return None
            row = found
        guard = GuardState(row.pending_removal_digest, int(row.pending_removal_streak))
        return int(row.version), guard

    def note_failure(
        self,
        conn: Connection,
        iid: int,
        *,
        failures: int,
        kind: str | None,
        due: datetime | None,
        now: datetime,
        claim: Claim | None,
    ) -> None:
        """A failed tick's mark on the instance's state: its failures in a row, their kind
        and when it is due again (backoff), so that any replica, or a restart, honours
        them. Fenced like a tick's writes (a replica that lost the instance says nothing
        of it any more)."""
        values = {"failures": failures, "failure_kind": kind, "next_due_at": due}
        if claim is None:
            stmt = self.insert(state_t).values(
                instance_id=iid, pending_removal_streak=0, updated_at=now, **values
            )
            conn.execute(
                stmt.on_conflict_do_update(index_elements=[state_t.c.instance_id], set_=values)
            )
            return
        conn.execute(
            update(state_t)
            .where(
                state_t.c.instance_id == iid,
                state_t.c.lease_owner == claim.owner,
                state_t.c.lease_epoch == claim.epoch,
            )
            .values(**values)
        )

    def load_health(self, conn: Connection, ids: Sequence[int]) -> Sequence[Any]:
        """``instance_id, failures, failure_kind, next_due_at`` of the instances' state."""
        return conn.execute(
            select(
                state_t.c.instance_id,
                state_t.c.failures,
                state_t.c.failure_kind,
                state_t.c.next_due_at,
            ).where(state_t.c.instance_id.in_(bindparam("ids", expanding=True))),
            {"ids": list(ids)},
        ).all()

    def lock_registry(self, conn: Connection) -> None:
        """Serialise the writers of the ``instances`` table (replicas starting together)."""

    def change_seq(self, conn: Connection) -> Any:
        """The ``change_seq`` of the rows this transaction writes next, as a value for a
        Core statement's ``values()`` (docs/queries.md#incremental-loads)."""
        raise NotImplementedError

    def save_guard_state(
        self, conn: Connection, iid: int, state: GuardState, now: datetime
    ) -> None:
        conn.execute(
            update(state_t)
            .where(state_t.c.instance_id == iid)
            .values(
                pending_removal_digest=state.sample,
                pending_removal_streak=state.streak,
                updated_at=now,
            )
        )

    # -- reads ---------------------------------------------------------------------------

    def load_snapshot(self, conn: Connection, iid: int) -> Snapshot:
        """Every stored chat of the instance, as fingerprints."""
        return Snapshot.from_rows(
            conn.execute(select(*STORED_CHAT).where(chats_t.c.instance_id == iid))
        )

    def load_stored(self, conn: Connection, iid: int) -> Snapshot:
        """Every stored chat of the instance as fingerprints, with its ids (``identity``).
        An instance without chats has no ids to read: an alias belongs to a stored chat
        (a foreign key), the id in use is a column of one; its first load skips the reads."""
        snap = self.load_snapshot(conn, iid)
        if snap.fingerprints:
            snap.identity = self.load_identity(conn, iid)
        return snap

    def load_rows(self, conn: Connection, iid: int, chat_ids: list[str]) -> dict[str, StoredChat]:
        """Stored rows (with the open history period's start) of the chats that may have
        changed."""
        out: dict[str, StoredChat] = {}
        for i in range(0, len(chat_ids), self.read_chunk):
            params = {"iid": iid, "ids": chat_ids[i : i + self.read_chunk]}
            out.update({r.chat_id: cast(StoredChat, r) for r in self._read(conn, params)})
        return out

    def _read(self, conn: Connection, params: dict[str, Any]) -> Sequence[Any]:
        return conn.execute(self.load_rows_stmt, params).all()

    def state_version(self, conn: Connection, iid: int) -> int:
        """The instance's state version as stored (0 before its first tick)."""
        version = conn.execute(
            select(state_t.c.version).where(state_t.c.instance_id == iid)
        ).scalar()
        return int(version or 0)

    def load_packed(self, conn: Connection, ids: Sequence[int]) -> list[PersistedSnapshot]:
        """The persisted snapshots of these instances that describe their state as it is
        (their version is the state's), or describe an older one and have a floor to be
        topped up from."""
        rows = conn.execute(
            select(
                snapshots_t.c.instance_id,
                snapshots_t.c.version,
                state_t.c.version.label("state_version"),
                snapshots_t.c.change_seq_floor,
                snapshots_t.c.data,
            )
            .join(state_t, state_t.c.instance_id == snapshots_t.c.instance_id)
            .where(
                snapshots_t.c.instance_id.in_(bindparam("ids", expanding=True)),
                or_(
                    snapshots_t.c.version == state_t.c.version,
                    snapshots_t.c.change_seq_floor.is_not(None),
                ),
            ),
            {"ids": list(ids)},
        )
        return [
            PersistedSnapshot(
                int(r.instance_id),
                int(r.version),
                int(r.state_version),
                None if r.change_seq_floor is None else int(r.change_seq_floor),
                bytes(r.data),
            )
            for r in rows
        ]

    def load_since(
        self, conn: Connection, floors: Mapping[int, int]
    ) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
        """The chat rows (``STORED_CHAT`` and ``current_chat_id``) and alias rows (alias
        id, chat id) of these instances written at or above each one's floor, by
        instance. Each instance with its own floor: one lowest floor for all would read
        every row an instance idle for hours has left below its own."""
        chats: dict[int, list[Any]] = {}
        aliases: dict[int, list[Any]] = {}
        for iid, floor in floors.items():
            params = {"iid": iid, "floor": floor}
            if rows := list(conn.execute(self.chats_since, params)):
                chats[iid] = rows
            if pairs := list(conn.execute(self.aliases_since, params)):
                aliases[iid] = pairs
        return chats, aliases

    def save_snapshot(self, conn: Connection, snapshot: SnapshotWrite | None) -> None:
        """The instance's persisted snapshot, in a statement of its own (None: not
        persisted by this syncer)."""
        if snapshot is None:
            return
        if snapshot.data is None:
            params = {"iid": snapshot.instance_id, "version": snapshot.version}
            conn.execute(self.bump_snapshot, params)
        else:
            self.save_snapshots(conn, [snapshot])

    def save_snapshots(self, conn: Connection, writes: Sequence[SnapshotWrite]) -> None:
        """Snapshots with their data, in one statement; each replaces only an older one
        (written apart from a tick, a tick of another process may have written a newer
        one since)."""
        values = [
            {
                "instance_id": w.instance_id,
                "version": w.version,
                "data": w.data,
                "updated_at": w.now,
                "change_seq_floor": w.floor,
            }
            for w in writes
        ]
        conn.execute(self.upsert_snapshot, values)

    def load_identity(self, conn: Connection, iid: int) -> Identity:
        """The instance's aliases, and the ids in use that are not the chats' own."""
        aliases = conn.execute(
            select(aliases_t.c.alias_id, aliases_t.c.chat_id).where(aliases_t.c.instance_id == iid)
        )
        current = conn.execute(
            select(chats_t.c.chat_id, chats_t.c.current_chat_id).where(
                chats_t.c.instance_id == iid, chats_t.c.current_chat_id.is_not(None)
            )
        )
        return Identity(aliases={a: c for a, c in aliases}, current={c: cur for c, cur in current})

    # -- writes --------------------------------------------------------------------------

    def write_run(
        self,
        conn: Connection,
        locked: Locked,
        row: dict[str, Any],
        snapshot: SnapshotWrite | None = None,
    ) -> int:
        """The run row of a tick that applies nothing (an anomaly, a lost tick), and its
        snapshot; returns its id."""
        raise NotImplementedError

    def write_tick(
        self,
        conn: Connection,
        locked: Locked,
        plan: TickPlan,
        run: RunRow,
        snapshot: SnapshotWrite | None,
    ) -> int:
        """Every write of ``plan``, the snapshot and the run row; returns the run's id."""
        raise NotImplementedError

    def write_first_load(
        self,
        conn: Connection,
        locked: Locked,
        load: FirstLoad,
        run: RunRow,
        snapshot: SnapshotWrite | None,
    ) -> int:
        """A first load; by default the same writes as any tick."""
        return self.write_tick(conn, locked, load.expand(), run, snapshot)

    def write_identity(
        self,
        conn: Connection,
        iid: int,
        changes: Sequence[IdChange],
        aliases: dict[str, tuple[str, str]],
        now: datetime,
    ) -> None:
        """After a tick's chats are written: the aliases learnt (alias -> (chat, source))
        and the ids now in use (``current_chat_id``; each one is the chat's own id or an
        alias, stored before or among ``aliases``)."""
        # the incremental cursor moves with the rows (docs/queries.md#incremental-loads)
        seq = self.change_seq(conn) if aliases or changes else None
        if aliases:
            conn.execute(
                self.upsert_aliases.values(change_seq=seq),
                [
                    {
                        "instance_id": iid,
                        "alias_id": a,
                        "chat_id": c,
                        "source": src,
                        "linked_at": now,
                    }
                    for a, (c, src) in aliases.items()
                ],
            )
        if changes:
            conn.execute(
                self.set_current_id.values(change_seq=seq),
                [
                    {
                        "b_iid": iid,
                        "b_chat_id": c.chat_id,
                        "b_current": None if c.new_id == c.chat_id else c.new_id,
                        "b_now": now,
                    }
                    for c in changes
                ],
            )

    def take_switch_acceptance(self, conn: Connection, iid: int, since: datetime) -> bool:
        """Whether the operator accepted an unlinked id switch (``etl ids accept``) at or
        after ``since``; the acceptance is used up by the tick that asks (an older one has
        lapsed: it was meant for a switch that is over)."""
        accepted = conn.execute(
            update(state_t)
            .where(
                state_t.c.instance_id == iid,
                state_t.c.id_switch_accepted_at.is_not(None),
                state_t.c.id_switch_accepted_at >= since,
            )
            .values(id_switch_accepted_at=None)
            .returning(state_t.c.instance_id)
        ).first()
        return accepted is not None

    def write_failure(self, conn: Connection, row: dict[str, Any]) -> int:
        """The run row of a failed tick, in a transaction of its own; returns its id."""
        stmt = insert(runs_t).values(**row, change_seq=self.change_seq(conn))
        return int(conn.execute(stmt.returning(runs_t.c.id)).scalar_one())

    def write_failures(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Failed ticks kept while the database was unreachable."""
        conn.execute(insert(runs_t).values(change_seq=self.change_seq(conn)), rows)

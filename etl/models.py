"""SQLAlchemy 2.x models. Table and column names are a public contract (BI queries use them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SYNC_STATUSES = ("ok", "anomaly", "failed")
#: the messengers Green-API serves on the same getChats path
PLATFORMS = ("whatsapp", "telegram", "max")

#: BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements)
BigId = BigInteger().with_variant(Integer(), "sqlite")

#: PostgreSQL's number of the current write transaction, as the ``change_seq`` of what it
#: writes (the column's default there; updates set it explicitly)
PG_CHANGE_SEQ = "CAST(CAST(pg_current_xact_id() AS text) AS bigint)"


def change_seq_column() -> Mapped[int]:
    """The incremental-load cursor of a table that changes (docs/queries.md#incremental-loads):
    the number of the write transaction that last inserted or changed the row.

    PostgreSQL: the transaction id (the column's default, revision 0008); rows are final
    below ``load_watermark``. SQLite: the store's counter, one above every number stored
    (writers are serialised). Rows from before 0008 have 1.
    """
    return mapped_column(BigInteger, index=True)


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMPTZ on PostgreSQL; on SQLite a UTC text timestamp. Always returns aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; every timestamp must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text from a func/aggregate
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class InstanceRow(Base):
    """A configured Green-API instance. Never holds a token."""

    __tablename__ = "instances"

    id_instance: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(Text, default="")
    api_url: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    change_seq: Mapped[int] = change_seq_column()
    #: the messenger the instance serves (``PLATFORMS``), from its config
    platform: Mapped[str] = mapped_column(
        Text, default="whatsapp", server_default=text("'whatsapp'")
    )


class Chat(Base):
    """One chat per (instance, ``chat_id``). ``chat_id`` is the chat's identity: the first id
    it was seen under. When the API starts to name it otherwise (an ``@c.us`` chat seen as
    ``@lid``), ``current_chat_id`` holds the id in use and ``chat_aliases`` the other ids."""

    __tablename__ = "chats"
    __table_args__ = (
        # the snapshot reads the chats whose id changed; few of them, most of the time
        Index(
            "ix_chats_current_chat_id",
            "instance_id",
            postgresql_where=text("current_chat_id IS NOT NULL"),
            sqlite_where=text("current_chat_id IS NOT NULL"),
        ),
        # a stale snapshot is topped up from its instance's rows written since it
        # (``Store.load_since``): without this, PostgreSQL read the whole table per chunk
        Index("ix_chats_instance_change_seq", "instance_id", "change_seq"),
    )

    instance_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("instances.id_instance"), primary_key=True
    )
    chat_id: Mapped[str] = mapped_column(Text, primary_key=True)
    chat_type: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    archived: Mapped[bool] = mapped_column(Boolean)
    ephemeral_expiration: Mapped[int] = mapped_column(Integer)
    ephemeral_setting_at: Mapped[datetime | None]
    first_seen_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]
    change_seq: Mapped[int] = change_seq_column()
    #: the id getChats uses for the chat now, when it is not ``chat_id``; NULL otherwise
    current_chat_id: Mapped[str | None] = mapped_column(Text)


class ChatAlias(Base):
    """Another id of a chat: the id the API names it by after an id change, or one a
    documented Green-API method (or the operator) gave for it. ``alias_id`` maps to
    ``chat_id`` whenever a list carries it."""

    __tablename__ = "chat_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_aliases_chat",
        ),
        Index("ix_chat_aliases_chat", "instance_id", "chat_id"),
        Index("ix_chat_aliases_instance_change_seq", "instance_id", "change_seq"),  # as chats
    )

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    alias_id: Mapped[str] = mapped_column(Text, primary_key=True)
    chat_id: Mapped[str] = mapped_column(Text)
    #: where the link comes from: ``checkWhatsapp`` or ``operator``
    source: Mapped[str] = mapped_column(Text)
    linked_at: Mapped[datetime]
    change_seq: Mapped[int] = change_seq_column()


class ChatEphemeralHistory(Base):
    """SCD type 2: one row per ephemeral setting period; ``valid_to IS NULL`` is current."""

    __tablename__ = "chat_ephemeral_history"
    __table_args__ = (
        ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_ephemeral_history_chat",
        ),
        CheckConstraint("valid_to IS NULL OR valid_to > valid_from", name="valid_interval"),
        Index(
            "uq_chat_ephemeral_history_open",
            "instance_id",
            "chat_id",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
            sqlite_where=text("valid_to IS NULL"),
        ),
        Index("ix_chat_ephemeral_history_chat", "instance_id", "chat_id", "valid_from"),
        Index("ix_chat_ephemeral_history_sync_run_id", "sync_run_id"),  # retention
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger)
    chat_id: Mapped[str] = mapped_column(Text)
    ephemeral_expiration: Mapped[int] = mapped_column(Integer)
    ephemeral_setting_at: Mapped[datetime | None]
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime | None]
    sync_run_id: Mapped[int | None] = mapped_column(
        # deferred: on PostgreSQL the run row is written last, with its real end time
        BigInteger,
        ForeignKey("sync_runs.id", deferrable=True, initially="DEFERRED"),
    )
    change_seq: Mapped[int] = change_seq_column()


class ChatPresence(Base):
    """When each chat was in the instance's list: one row per period of presence, the gaps
    between them are its absences; ``valid_to IS NULL`` while it is in the list."""

    __tablename__ = "chat_presence"
    __table_args__ = (
        ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_presence_chat",
        ),
        # an empty period is a chat seen and missed at the same clock reading
        CheckConstraint("valid_to IS NULL OR valid_to >= valid_from", name="valid_interval"),
        Index(
            "uq_chat_presence_open",
            "instance_id",
            "chat_id",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
            sqlite_where=text("valid_to IS NULL"),
        ),
        Index("ix_chat_presence_chat", "instance_id", "chat_id", "valid_from"),
        Index("ix_chat_presence_sync_run_id", "sync_run_id"),  # retention
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger)
    chat_id: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime | None]
    sync_run_id: Mapped[int | None] = mapped_column(
        BigInteger,
        ForeignKey("sync_runs.id", deferrable=True, initially="DEFERRED"),
    )
    change_seq: Mapped[int] = change_seq_column()


class SyncRun(Base):
    """One row per instance per tick, whatever the outcome."""

    __tablename__ = "sync_runs"
    __table_args__ = (
        CheckConstraint("status IN ('ok', 'anomaly', 'failed')", name="status"),
        Index("ix_sync_runs_instance_started", "instance_id", "started_at"),
        Index("ix_sync_runs_started_at", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("instances.id_instance"))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_kind: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    chats_received: Mapped[int] = mapped_column(Integer, default=0)
    chats_inserted: Mapped[int] = mapped_column(Integer, default=0)
    chats_updated: Mapped[int] = mapped_column(Integer, default=0)
    chats_removed: Mapped[int] = mapped_column(Integer, default=0)
    chats_rejected: Mapped[int] = mapped_column(Integer, default=0)
    ephemeral_changes: Mapped[int] = mapped_column(Integer, default=0)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    #: seconds until this instance is polled again when backing off; NULL = normal interval
    backoff_seconds: Mapped[int | None] = mapped_column(Integer)
    change_seq: Mapped[int] = change_seq_column()
    #: chats whose id changed in this tick (``id_changed`` events)
    ids_changed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    #: the instance's state per getStateInstance, when the tick asked for it
    instance_state: Mapped[str | None] = mapped_column(Text)


EVENT_TYPES = (
    "created",
    "renamed",
    "archived",
    "unarchived",
    "ephemeral_changed",
    "removed",
    "reappeared",
    "id_changed",
)


class ChatEvent(Base):
    """What happened to a chat, written in the same transaction as the sync that saw it."""

    __tablename__ = "chat_events"
    __table_args__ = (
        Index("ix_chat_events_occurred_at", "occurred_at"),
        Index("ix_chat_events_chat", "instance_id", "chat_id", "occurred_at"),
        Index("ix_chat_events_sync_run_id", "sync_run_id"),  # retention
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("instances.id_instance"))
    chat_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime]
    sync_run_id: Mapped[int | None] = mapped_column(
        # deferred: on PostgreSQL the run row is written last, with its real end time
        BigInteger,
        ForeignKey("sync_runs.id", deferrable=True, initially="DEFERRED"),
    )
    change_seq: Mapped[int] = change_seq_column()


class InstanceSyncState(Base):
    """Per-instance memory between ticks: the mass-removal confirmation streak, when the
    instance is due and how it is failing (so that any replica, or a restart, honours its
    backoff), and which replica owns it under which fencing epoch (``etl/leases.py``)."""

    __tablename__ = "instance_sync_state"
    __table_args__ = (Index("ix_instance_sync_state_lease_owner", "lease_owner"),)

    instance_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("instances.id_instance"), primary_key=True
    )
    pending_removal_digest: Mapped[str | None] = mapped_column(Text)
    pending_removal_streak: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]
    #: the replica that owns the instance (``replicas.replica_id``); its lease is the
    #: replica's (``replicas.lease_until``)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    #: the fencing token: bumped whenever the instance changes hands; a write made under
    #: an older epoch is refused
    lease_epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: bumped by every applied tick; lets a process trust its cached fingerprints
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: set by ``etl ids accept``: the next tick applies an id switch no link explains
    id_switch_accepted_at: Mapped[datetime | None]
    #: when the next tick is due: one interval after the last, or later while backing off
    next_due_at: Mapped[datetime | None]
    #: failed ticks in a row, and the kind of the last one (the backoff's inputs)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failure_kind: Mapped[str | None] = mapped_column(Text)


class InstanceSnapshot(Base):
    """What the sync knows of an instance's stored chats, packed (``etl.sync.snapshot``),
    written by ticks: a new process reads it instead of every chat row. Used as it is
    while ``version`` is the state's, topped up from the rows at or above
    ``change_seq_floor`` once it is behind; an optimisation only."""

    __tablename__ = "instance_snapshots"

    instance_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("instances.id_instance"), primary_key=True
    )
    #: the ``instance_sync_state.version`` it describes
    version: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime]
    #: every chat and alias row written after ``version`` has a ``change_seq`` at least
    #: this (the ``load_watermark`` seen by the tick that wrote ``version``), so a stale
    #: snapshot is topped up from those rows alone; NULL: usable only while current
    change_seq_floor: Mapped[int | None] = mapped_column(BigInteger)


class Replica(Base):
    """A running ``etl run`` process sharing this PostgreSQL (see ``etl/leases.py``)."""

    __tablename__ = "replicas"

    replica_id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    #: the replica's lease on every instance it owns: renewed by each heartbeat; once it
    #: has passed, the instances are free to be claimed by another replica
    lease_until: Mapped[datetime | None]


# The tables as SQLAlchemy Core sees them, for the statements that do not go through the ORM.
instances_t = cast(Table, InstanceRow.__table__)
chats_t = cast(Table, Chat.__table__)
history_t = cast(Table, ChatEphemeralHistory.__table__)
presence_t = cast(Table, ChatPresence.__table__)
runs_t = cast(Table, SyncRun.__table__)
events_t = cast(Table, ChatEvent.__table__)
aliases_t = cast(Table, ChatAlias.__table__)
state_t = cast(Table, InstanceSyncState.__table__)
replicas_t = cast(Table, Replica.__table__)
snapshots_t = cast(Table, InstanceSnapshot.__table__)

#: the tables with a ``change_seq`` cursor, in the order docs/queries.md lists them
CURSOR_TABLES = (chats_t, aliases_t, history_t, presence_t, events_t, runs_t, instances_t)

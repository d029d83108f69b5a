"""One instance's sync: fetch, decode, diff against stored state, write in one transaction.

The HTTP fetch happens outside any database transaction. The write transaction takes a
per-instance lock first (see ``db.lock_instance``), reads the stored state, and writes
the changed chats, the SCD2 history rows and the ``sync_runs`` row together.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import Connection, Engine, Table, and_, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from etl.client import GreenApiClient
from etl.clock import utcnow
from etl.config import Instance
from etl.db import (
    dialect_insert,
    instance_lock_key,
    lock_instance,
    lock_registry,
    pg_insert_rows,
    pg_json_insert_sql,
    pg_json_rows,
    pg_values_sql,
    written_listeners,
)
from etl.errors import SyncError
from etl.models import Chat as ChatModel
from etl.models import ChatEphemeralHistory, ChatEvent, InstanceRow, InstanceSyncState, SyncRun
from etl.payload import ChatRecord, DecodedChats, decode_chats
from etl.redact import redact

log = logging.getLogger(__name__)

chats_t = cast(Table, ChatModel.__table__)
history_t = cast(Table, ChatEphemeralHistory.__table__)
runs_t = cast(Table, SyncRun.__table__)
instances_t = cast(Table, InstanceRow.__table__)
state_t = cast(Table, InstanceSyncState.__table__)
events_t = cast(Table, ChatEvent.__table__)

#: the most ticks written in one transaction (group commit; see ``Syncer._group_write``)
GROUP_LIMIT = 32
#: how many groups are written at once, so that the database works on several in
#: parallel and a slow round trip does not stall every tick (1 writer: steady tick 1.9x
#: the floor, cold 11.8x; 2 writers: 1.56x and 6.4x; 4: 1.55x and 6.4x, at 1,000 x 500)
GROUP_WRITERS = 4
#: how far in the future an API timestamp may be and still be trusted (clock skew)
MAX_CLOCK_SKEW = timedelta(minutes=5)
_EPSILON = timedelta(microseconds=1)


@dataclass(slots=True)
class SyncOutcome:
    """What one tick did; mirrors a ``sync_runs`` row (``status == "skipped"`` writes none)."""

    instance_id: int
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    http_status: int | None = None
    error_kind: str | None = None
    error: str | None = None
    attempts: int = 0
    chats_received: int = 0
    chats_inserted: int = 0
    chats_updated: int = 0
    chats_removed: int = 0
    chats_rejected: int = 0
    ephemeral_changes: int = 0
    duration_ms: int = 0
    backoff_seconds: int | None = None
    sync_run_id: int | None = None
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "http_status": self.http_status,
            "error_kind": self.error_kind,
            "error": self.error,
            "attempts": self.attempts,
            "chats_received": self.chats_received,
            "chats_inserted": self.chats_inserted,
            "chats_updated": self.chats_updated,
            "chats_removed": self.chats_removed,
            "chats_rejected": self.chats_rejected,
            "ephemeral_changes": self.ephemeral_changes,
            "duration_ms": self.duration_ms,
            "backoff_seconds": self.backoff_seconds,
        }


def choose_valid_from(
    setting_at: datetime | None, previous_from: datetime | None, observed_at: datetime
) -> datetime:
    """When a new ephemeral period starts.

    The API's timestamp when it is set and plausible (after the previous period's start,
    at most ``MAX_CLOCK_SKEW`` ahead of us), else the time we observed the change; never
    at or before the previous period's start, so intervals cannot overlap.
    """
    if (
        setting_at is not None
        and setting_at <= observed_at + MAX_CLOCK_SKEW
        and (previous_from is None or setting_at > previous_from)
    ):
        return setting_at
    if previous_from is not None and observed_at <= previous_from:
        return previous_from + _EPSILON
    return observed_at


#: failures that will not go away by retrying soon: back off from the first one
PERMANENT_KINDS = frozenset(
    {
        "unauthorized",
        "forbidden",
        "not_found",
        "quota_exceeded",
        "not_authorized",
        "expired",
        "bad_request",
    }
)
#: never back off on these: the instance is fine, our side is not (resume at once)
NO_BACKOFF_KINDS = frozenset({"database"})


def backoff_seconds(instance: Instance, failures: int, kind: str | None) -> int | None:
    """Delay before the next sync after ``failures`` consecutive failed ticks, or None
    for the normal interval. Doubles per failure, capped at ``backoff_max_seconds``.

    Permanent errors back off from the first failure; transient ones (429, 5xx,
    timeouts) after ``backoff_after_transient_failures`` failures in a row.
    """
    if failures <= 0 or kind in NO_BACKOFF_KINDS:
        return None
    if kind in PERMANENT_KINDS:
        exponent = failures
    else:
        exponent = failures - instance.backoff_after_transient_failures + 1
    if exponent <= 0:
        return None
    interval = instance.interval_seconds
    cap = max(interval, instance.backoff_max_seconds)
    delay = min(cap, interval * 2 ** min(exponent, 30))
    return delay if delay > interval else None


@dataclass(slots=True)
class _Health:
    failures: int = 0
    kind: str | None = None
    next_due: float = 0.0  # time.monotonic()


VANISHED_SAMPLE_SIZE = 32
#: failed ticks kept in memory while the database is unreachable (~0.5 kB each)
UNRECORDED_LIMIT = 20_000


def _vanished_sample(vanished: set[str]) -> str:
    """Up to 32 of the missing ids, picked by hash (so spread over the set), as JSON."""
    picked = heapq.nsmallest(
        VANISHED_SAMPLE_SIZE,
        vanished,
        key=lambda cid: hashlib.blake2b(
            cid.encode("utf-8", "surrogatepass"), digest_size=8
        ).digest(),
    )
    return orjson.dumps(sorted(picked)).decode()


def _parse_vanished_sample(stored: str | None) -> set[str] | None:
    """The sample saved by the last anomaly tick; None when there is none (or an old digest)."""
    if not stored or not stored.startswith("["):
        return None
    try:
        ids = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return None
    return {str(i) for i in ids} if isinstance(ids, list) else None


def register_instances(
    engine: Engine, instances: Sequence[Instance], *, now: datetime | None = None
) -> None:
    """Mirror the configured instances into ``instances``; drop-outs become ``enabled = false``."""
    now = now or utcnow()
    configured = {i.id_instance: i for i in instances}
    with engine.begin() as conn:
        lock_registry(conn)
        stored = {
            r.id_instance: r
            for r in conn.execute(
                select(
                    instances_t.c.id_instance,
                    instances_t.c.label,
                    instances_t.c.api_url,
                    instances_t.c.enabled,
                )
            )
        }
        new_rows = []
        for inst in instances:
            row = stored.get(inst.id_instance)
            values = {"label": inst.label, "api_url": inst.api_url, "enabled": inst.enabled}
            if row is None:
                new_rows.append(
                    {"id_instance": inst.id_instance, "created_at": now, "updated_at": now} | values
                )
            elif (row.label, row.api_url, row.enabled) != tuple(values.values()):
                conn.execute(
                    update(instances_t)
                    .where(instances_t.c.id_instance == inst.id_instance)
                    .values(updated_at=now, **values)
                )
        if new_rows:
            conn.execute(insert(instances_t), new_rows)
        gone = [i for i, r in stored.items() if i not in configured and r.enabled]
        if gone:
            conn.execute(
                update(instances_t)
                .where(instances_t.c.id_instance.in_(gone))
                .values(enabled=False, updated_at=now)
            )


#: the columns a re-seen chat's upsert overwrites (``first_seen_at`` is kept)
_UPSERT_UPDATES = (
    "chat_type",
    "name",
    "archived",
    "ephemeral_expiration",
    "ephemeral_setting_at",
    "updated_at",
    "removed_at",
)


#: what a tick compares a chat with (the snapshot's fingerprint and the full diff)
_STORED_CHAT = (
    chats_t.c.chat_id,
    chats_t.c.chat_type,
    chats_t.c.name,
    chats_t.c.archived,
    chats_t.c.ephemeral_expiration,
    chats_t.c.ephemeral_setting_at,
    chats_t.c.removed_at,
)


class _Statements:
    """The tick's statements, built once per dialect: building and hashing a statement
    (an upsert with seven ``excluded`` columns above all) on every execute was ~12% of a
    steady tick's CPU; a prebuilt one reuses its cache key and compiled form."""

    def __init__(self, dialect: str) -> None:
        bump = dialect_insert(dialect, state_t).values(
            instance_id=bindparam("iid"),
            pending_removal_streak=0,
            updated_at=bindparam("now"),
            version=1,
        )
        self.bump_state = bump.on_conflict_do_update(
            index_elements=[state_t.c.instance_id],
            set_={"version": state_t.c.version + 1},
        ).returning(
            state_t.c.version, state_t.c.pending_removal_digest, state_t.c.pending_removal_streak
        )
        self.load_rows = (
            select(*_STORED_CHAT, history_t.c.valid_from.label("open_from"))
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
        upsert = dialect_insert(dialect, chats_t)
        self.upsert_chats = upsert.on_conflict_do_update(
            index_elements=[chats_t.c.instance_id, chats_t.c.chat_id],
            set_={c: upsert.excluded[c] for c in _UPSERT_UPDATES},
        )
        self.mark_removed = (
            update(chats_t)
            .where(
                chats_t.c.instance_id == bindparam("iid"),
                chats_t.c.chat_id.in_(bindparam("ids", expanding=True)),
            )
            .values(removed_at=bindparam("now"), updated_at=bindparam("now"))
        )
        self.close_history = (
            update(history_t)
            .where(
                and_(
                    history_t.c.instance_id == bindparam("b_iid"),
                    history_t.c.chat_id == bindparam("b_chat_id"),
                    history_t.c.valid_to.is_(None),
                )
            )
            .values(valid_to=bindparam("b_valid_to"))
        )
        self.insert_run = insert(runs_t).returning(runs_t.c.id)
        #: PostgreSQL runs the same statements as driver SQL (see ``etl.db.pg_values_sql``)
        self.pg = dialect == "postgresql"


# The lock is taken in ``l`` (materialised, so exactly once) before ``b`` bumps the state;
# ON CONFLICT DO UPDATE works on the row's latest committed version, even one newer than
# the statement's snapshot, so the version returned is right.
_PG_LOCK_CTES = """
WITH l AS MATERIALIZED (
  SELECT pg_try_advisory_xact_lock(%(k1)s, %(k2)s) AS got,
         nextval(pg_get_serial_sequence('sync_runs', 'id')) AS run_id
), b AS (
  INSERT INTO instance_sync_state AS s
    (instance_id, pending_removal_streak, updated_at, version)
  SELECT %(iid)s, 0, %(now)s, 1 FROM l WHERE l.got
  ON CONFLICT (instance_id) DO UPDATE SET version = s.version + 1
  RETURNING s.version, s.pending_removal_digest, s.pending_removal_streak
)"""
_PG_LOCK_COLUMNS = "l.got, l.run_id, b.version, b.pending_removal_digest, b.pending_removal_streak"

_PG_LOCK_AND_BUMP = f"{_PG_LOCK_CTES}\nSELECT {_PG_LOCK_COLUMNS}\nFROM l LEFT JOIN b ON true\n"

_PG_LOAD_ROWS = """
SELECT c.chat_id, c.chat_type, c.name, c.archived, c.ephemeral_expiration,
       c.ephemeral_setting_at, c.removed_at, h.valid_from AS open_from
FROM chats c
LEFT OUTER JOIN chat_ephemeral_history h
  ON h.instance_id = c.instance_id AND h.chat_id = c.chat_id AND h.valid_to IS NULL
WHERE c.instance_id = %(iid)s AND c.chat_id = ANY(%(ids)s)
"""

#: ``_PG_LOCK_AND_BUMP`` and ``_PG_LOAD_ROWS`` in one round trip: one row per stored chat
#: read (the lock's columns repeated), or one row with a NULL ``chat_id`` when none is
#: found or the lock was not free. With the closes folded into the write (``_pg_write_tick``)
#: a steady tick went from 4 statements to 2 (1,000 x 500: process CPU 2.60 -> 2.27 s a tick).
_PG_LOCK_BUMP_AND_READ = (
    f"{_PG_LOCK_CTES}, r AS ({_PG_LOAD_ROWS})\nSELECT r.*, {_PG_LOCK_COLUMNS}\n"
    "FROM l LEFT JOIN b ON true LEFT JOIN r ON l.got\n"
)

#: chats read back per statement
_READ_CHUNK = 5000

_PG_UPSERT_CHATS_SUFFIX = " ON CONFLICT (instance_id, chat_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _UPSERT_UPDATES
)

#: parameters: (now, now, instance id, chat ids); also a part of ``_pg_write_tick``
_PG_MARK_REMOVED = (
    "UPDATE chats SET removed_at = %s, updated_at = %s WHERE instance_id = %s AND chat_id = ANY(%s)"
)

#: parameters: (rows as JSON, instance id); a part of ``_pg_write_tick``
_PG_CLOSE_HISTORY = """
UPDATE chat_ephemeral_history AS h SET valid_to = v.valid_to
FROM json_to_recordset(%s::json) AS v (chat_id text, valid_to timestamptz)
WHERE h.instance_id = %s AND h.chat_id = v.chat_id AND h.valid_to IS NULL RETURNING 1
"""


@functools.cache
def _statements(dialect: str) -> _Statements:
    return _Statements(dialect)


class Syncer:
    """Runs syncs; safe to call from many threads. One sync per instance at a time."""

    def __init__(
        self,
        engine: Engine,
        client: GreenApiClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.client = client
        self.clock = clock
        self.monotonic = monotonic
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._health: dict[int, _Health] = {}
        self._snapshots: dict[int, _Snapshot] = {}
        #: called with every finished outcome (metrics, status); errors are logged, not raised
        self.listeners: list[Callable[[Instance, SyncOutcome], None]] = []
        #: failed ticks not yet in ``sync_runs`` because the database was unreachable too;
        #: written after the next transaction that succeeds (bounded, oldest dropped first)
        self._unrecorded: deque[SyncOutcome] = deque(maxlen=UNRECORDED_LIMIT)
        self._unrecorded_dropped = 0
        self._unrecorded_lock = threading.Lock()
        self._group_lock = threading.Lock()
        self._group_queue: list[_Pending] = []
        self._group_writers = 0
        #: how many groups of each size were written (tests and benchmarks read it)
        self.group_sizes: Counter[int] = Counter()

    def due(self, instance: Instance) -> bool:
        """False while the instance is backing off after failures (the daemon skips it)."""
        health = self._health.get(instance.id_instance)
        return health is None or self.monotonic() >= health.next_due

    def consecutive_failures(self, instance_id: int) -> int:
        health = self._health.get(instance_id)
        return health.failures if health else 0

    def restore_backoff(self, instances: Sequence[Instance]) -> None:
        """Resume backoff after a restart from the failures recorded in ``sync_runs``."""
        by_id = {i.id_instance: i for i in instances}
        now = self.clock()
        with self.engine.connect() as conn:
            for iid, inst in by_id.items():
                recent = conn.execute(
                    select(runs_t.c.status, runs_t.c.error_kind, runs_t.c.started_at)
                    .where(runs_t.c.instance_id == iid)
                    .order_by(runs_t.c.started_at.desc(), runs_t.c.id.desc())
                    .limit(64)
                ).all()
                failures = 0
                for row in recent:
                    if row.status != "failed":
                        break
                    failures += 1
                if not failures:
                    continue
                delay = backoff_seconds(inst, failures, recent[0].error_kind)
                elapsed = (now - recent[0].started_at).total_seconds()
                health = _Health(failures, recent[0].error_kind)
                if delay is not None:
                    health.next_due = self.monotonic() + max(0.0, delay - elapsed)
                self._health[iid] = health

    def _note_result(self, instance: Instance, outcome: SyncOutcome) -> None:
        """Track consecutive failures and decide this instance's next due time."""
        health = self._health.setdefault(instance.id_instance, _Health())
        if outcome.status == "failed":
            health.failures += 1
            health.kind = outcome.error_kind
        else:
            health.failures, health.kind = 0, None
        outcome.backoff_seconds = backoff_seconds(instance, health.failures, health.kind)
        # a little early, so scheduler jitter never makes us skip the tick that is due
        delay = outcome.backoff_seconds or 0
        health.next_due = self.monotonic() + max(0.0, delay - 1.0)
        if outcome.backoff_seconds:
            log.warning(
                "instance %s: %d consecutive failures (%s), backing off: next sync in %ds",
                instance.id_instance,
                health.failures,
                health.kind,
                outcome.backoff_seconds,
            )

    def _lock_for(self, instance_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(instance_id, threading.Lock())

    def sync(self, instance: Instance) -> SyncOutcome:
        lock = self._lock_for(instance.id_instance)
        if not lock.acquire(blocking=False):
            log.warning(
                "instance %s: previous sync still running, skipping this tick",
                instance.id_instance,
            )
            return SyncOutcome(instance.id_instance, "skipped", self.clock())
        try:
            outcome = self._sync(instance)
        finally:
            lock.release()
        for listener in self.listeners:
            try:
                listener(instance, outcome)
            except Exception:
                log.exception("sync listener failed")
        return outcome

    def _sync(self, instance: Instance) -> SyncOutcome:
        outcome = SyncOutcome(instance.id_instance, "ok", self.clock())
        t0 = time.monotonic()
        try:
            fetched = self.client.get_chats(instance)
            outcome.attempts = fetched.attempts
            outcome.http_status = fetched.http_status
            # elements identical to the last list this process applied skip validation
            decoded_with = self._snapshots.get(instance.id_instance)
            known = decoded_with.raw if decoded_with is not None else None
            decoded = decode_chats(fetched.body, known=known, track=True)
        except SyncError as exc:
            outcome.status = "failed"
            outcome.error_kind = exc.error_kind
            outcome.http_status = exc.http_status
            outcome.attempts = exc.attempts or outcome.attempts
            outcome.error = redact(exc.message)
            self._finish(outcome, t0)
            self._note_result(instance, outcome)
            self._write_failure(outcome)
            return outcome

        pending = _Pending(instance, decoded, fetched.body, decoded_with, outcome, t0)
        outcome = self._group_write(pending)
        if outcome.status == "failed":
            self._write_failure(outcome)
            return outcome
        self._log(instance, outcome)
        self.flush_unrecorded()
        return outcome

    # -- group commit ------------------------------------------------------------------
    #
    # Ticks that finish fetching while another thread is writing queue up and are then
    # written together, in one transaction, by the next thread to write ("group commit"):
    # one pool checkout, BEGIN and COMMIT per group instead of per instance. A lone tick is
    # a group of one, so a quiet daemon behaves exactly as before; the groups grow only
    # when writes queue up. If a group's transaction fails on a statement, every tick in
    # it is written again on its own, so one bad tick still fails alone.

    def _group_write(self, item: _Pending) -> SyncOutcome:
        with self._group_lock:
            if self._group_writers < GROUP_WRITERS:
                self._group_writers += 1
                waiting = None
            else:  # wait to be written by another thread, or to be handed its slot
                waiting = item.wake = threading.Lock()
                waiting.acquire()
                self._group_queue.append(item)
        if waiting is not None:
            waiting.acquire()  # released by the thread that wrote us or hands us its slot
            if item.result is not None:
                return self._result(item)
        with self._group_lock:  # a writer: its own tick first, then what queued up
            batch = [item, *self._group_queue[: GROUP_LIMIT - 1]]
            del self._group_queue[: GROUP_LIMIT - 1]
            self.group_sizes[len(batch)] += 1
        try:
            self._write_group(batch)
        except BaseException as exc:
            for other in batch:
                if other.result is None:
                    other.result = exc
            raise
        finally:
            for other in batch[1:]:
                assert other.wake is not None
                other.wake.release()
            with self._group_lock:
                successor = self._group_queue.pop(0) if self._group_queue else None
                if successor is None:
                    self._group_writers -= 1
            if successor is not None:
                assert successor.wake is not None
                successor.wake.release()  # the slot goes to the longest waiting tick
        return self._result(item)

    @staticmethod
    def _result(item: _Pending) -> SyncOutcome:
        if isinstance(item.result, BaseException):
            raise item.result
        assert item.result is not None
        return item.result

    def _write_group(self, batch: list[_Pending]) -> None:
        """Write the ticks of ``batch``; sets every item's ``result``."""
        if len(batch) > 1:
            began = False
            # one order for every group: two replicas' groups never wait on each other
            ordered = sorted(batch, key=lambda i: i.instance.id_instance)
            try:
                with self.engine.begin() as conn:
                    began = True
                    written = [self._write_tick(conn, item) for item in ordered]
            except SQLAlchemyError as exc:
                if not began or getattr(exc, "connection_invalidated", False):
                    # the database is unreachable: each tick alone would fail the same way
                    for item in batch:
                        item.result = self._database_failure(item, exc)
                    return
                log.info(
                    "a group of %d ticks failed (%s); writing them one by one",
                    len(batch),
                    type(exc).__name__,
                )
            else:
                for item, (outcome, after_commit) in zip(ordered, written, strict=True):
                    after_commit()
                    item.result = outcome
                return
        for item in batch:
            try:
                with self.engine.begin() as conn:
                    outcome, after_commit = self._write_tick(conn, item)
                after_commit()
            except SQLAlchemyError as exc:
                outcome = self._database_failure(item, exc)
            item.result = outcome

    def _write_tick(
        self, conn: Connection, item: _Pending
    ) -> tuple[SyncOutcome, Callable[[], None]]:
        """Apply one tick inside ``conn``'s transaction (a fresh outcome per attempt)."""
        fetched = item.fetched
        outcome = SyncOutcome(
            fetched.instance_id,
            "ok",
            fetched.started_at,
            http_status=fetched.http_status,
            attempts=fetched.attempts,
        )
        now = self.clock()
        iid = item.instance.id_instance
        prefetch = self._prefetch(conn, item)
        run_id, state, stored = self._lock_and_bump(
            conn, iid, now, prefetch.read_ids if prefetch else None
        )
        if prefetch is not None and stored is not None:
            prefetch.stored = stored
        return outcome, self._apply(conn, item, outcome, run_id, state, now, prefetch)

    def _prefetch(self, conn: Connection, item: _Pending) -> _Prefetch | None:
        """PostgreSQL, steady state: the chats to read back, judged against the cached
        snapshot before the lock, so that the read rides on the lock's round trip."""
        snap = self._snapshots.get(item.instance.id_instance)
        if (
            snap is None
            or not _statements(conn.dialect.name).pg
            or (item.decoded.unchanged and snap is not item.decoded_with)
        ):
            return None
        candidates = _candidates(item.decoded, snap)
        ids = [c.chat_id for c in candidates if c.chat_id in snap.fingerprints]
        if not ids or len(ids) > _READ_CHUNK:
            return None
        return _Prefetch(snap, candidates, ids)

    @classmethod
    def _lock_and_bump(
        cls, conn: Connection, iid: int, now: datetime, read_ids: list[str] | None = None
    ) -> tuple[int | None, tuple[int, str | None, int], dict[str, Any] | None]:
        """Take the instance's lock (``db.lock_instance``) and bump its state version;
        with ``read_ids`` (PostgreSQL) also read those chats' stored rows.

        PostgreSQL: one round trip when the lock is free (the usual case); a wait for the
        lock goes the long way, and reads nothing. The rows are read in the statement's
        snapshot, taken just before the lock: they are what ``_load_rows`` would read
        after it unless another writer committed in between, and such a writer bumped the
        version, so the caller's snapshot check (``version - 1``) throws them away.
        """
        if conn.dialect.name == "postgresql":
            key = instance_lock_key(iid)
            params = {"k1": key[0], "k2": key[1], "iid": iid, "now": now}
            if read_ids:
                rows = conn.exec_driver_sql(
                    _PG_LOCK_BUMP_AND_READ, {**params, "ids": read_ids}
                ).all()
                row = rows[0]
                stored = {r.chat_id: r for r in rows if r.chat_id is not None}
            else:
                row = conn.exec_driver_sql(_PG_LOCK_AND_BUMP, params).one()
                stored = None
            if row.got:
                for listener in written_listeners:
                    listener("instance_sync_state", 1)
                state = (int(row.version), row.pending_removal_digest, row.pending_removal_streak)
                return int(row.run_id), state, stored
        run_id = lock_instance(conn, iid)
        return run_id, cls._bump_state(conn, iid, now), None

    def _database_failure(self, item: _Pending, exc: SQLAlchemyError) -> SyncOutcome:
        """The failed outcome of a tick whose transaction failed (not yet recorded)."""
        self.forget_snapshot(item.instance.id_instance)
        orig = getattr(exc, "orig", None) or exc
        outcome = SyncOutcome(
            item.instance.id_instance,
            "failed",
            item.fetched.started_at,
            http_status=item.fetched.http_status,
            attempts=item.fetched.attempts,
            chats_received=item.decoded.received,
            error_kind="database",
            error=redact(f"{type(orig).__name__}: {str(orig)[:500]}"),
        )
        self._finish(outcome, item.t0)
        self._note_result(item.instance, outcome)
        return outcome

    def _finish(self, outcome: SyncOutcome, t0: float) -> None:
        outcome.finished_at = self.clock()
        outcome.duration_ms = int((time.monotonic() - t0) * 1000)

    def _write_failure(self, outcome: SyncOutcome) -> None:
        """Record a failed tick in its own transaction; keep it for later if even that fails."""
        try:
            with self.engine.begin() as conn:
                outcome.sync_run_id = conn.execute(
                    insert(runs_t).values(**outcome.row()).returning(runs_t.c.id)
                ).scalar_one()
        except SQLAlchemyError as exc:
            self.defer_failure(outcome, type(exc).__name__)
            return
        self._log_failure(outcome)
        self.flush_unrecorded()

    def defer_failure(self, outcome: SyncOutcome, reason: str) -> None:
        """A failed tick that cannot be written now: log it, write it when the database
        answers again (after the next transaction that succeeds)."""
        log.error(
            "instance %s: sync failed (%s) and could not be recorded yet (%s); it will be "
            "written to sync_runs when the database answers: %s",
            outcome.instance_id,
            outcome.error_kind,
            reason,
            outcome.error,
        )
        with self._unrecorded_lock:
            if len(self._unrecorded) == self._unrecorded.maxlen:
                self._unrecorded_dropped += 1
            self._unrecorded.append(outcome)

    def unreachable_outcome(self, instance: Instance, error: str) -> SyncOutcome:
        """A tick that never started because the database could not be reached."""
        now = self.clock()
        return SyncOutcome(
            instance.id_instance,
            "failed",
            now,
            finished_at=now,
            error_kind="database",
            error=redact(error),
            duration_ms=0,
        )

    def flush_unrecorded(self) -> int:
        """Write the failed ticks kept while the database was away; returns how many."""
        if not self._unrecorded:  # the common case, without the lock
            return 0
        with self._unrecorded_lock:
            pending = list(self._unrecorded)
            self._unrecorded.clear()
            dropped, self._unrecorded_dropped = self._unrecorded_dropped, 0
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(runs_t), [o.row() for o in pending])
        except SQLAlchemyError as exc:
            with self._unrecorded_lock:  # back in front of anything newer, in order
                self._unrecorded.extendleft(reversed(pending))
                self._unrecorded_dropped += dropped
            log.warning(
                "could not yet write %d failed ticks to sync_runs: %s",
                len(pending),
                type(exc).__name__,
            )
            return 0
        log.info(
            "wrote %d failed ticks kept while the database was unreachable to sync_runs%s",
            len(pending),
            f" ({dropped} older ones were dropped, over the limit of {UNRECORDED_LIMIT})"
            if dropped
            else "",
        )
        return len(pending)

    @staticmethod
    def _log_failure(outcome: SyncOutcome) -> None:
        log.warning(
            "instance %s: sync failed kind=%s http=%s attempts=%d in %dms: %s",
            outcome.instance_id,
            outcome.error_kind,
            outcome.http_status,
            outcome.attempts,
            outcome.duration_ms,
            outcome.error,
        )

    @staticmethod
    def _log(instance: Instance, o: SyncOutcome) -> None:
        log.info(
            "instance %s: %s%s received=%d inserted=%d updated=%d removed=%d rejected=%d "
            "ephemeral_changes=%d attempts=%d in %dms",
            instance.id_instance,
            o.status,
            f" ({o.error_kind})" if o.error_kind else "",
            o.chats_received,
            o.chats_inserted,
            o.chats_updated,
            o.chats_removed,
            o.chats_rejected,
            o.ephemeral_changes,
            o.attempts,
            o.duration_ms,
        )

    # -- the transaction -------------------------------------------------------------
    #
    # Speed: a steady fleet changes ~1% of chats per tick, so reading every stored chat
    # back each tick is most of the database cost. Each process keeps, per instance, a
    # fingerprint of every chat it last committed (``_Snapshot``). The state row's
    # ``version`` (bumped by every applied tick, under the instance lock) tells whether
    # anybody else wrote since; if so, the snapshot is rebuilt from the table. Only
    # chats whose fingerprint differs are read back and diffed in full.

    def _apply(
        self,
        conn: Connection,
        item: _Pending,
        outcome: SyncOutcome,
        run_id: int | None,
        state: tuple[int, str | None, int],
        now: datetime,
        prefetch: _Prefetch | None = None,
    ) -> Callable[[], None]:
        """Write one tick (the instance locked, its state bumped to ``state``); returns what
        to do once the transaction has committed."""
        instance, decoded, t0 = item.instance, item.decoded, item.t0
        iid = instance.id_instance
        outcome.chats_received = decoded.received
        outcome.chats_rejected = len(decoded.rejected)

        version, pending_digest, pending_streak = state
        snap = self._snapshots.get(iid)
        if snap is None or snap.version != version - 1:
            snap = self._load_snapshot(conn, iid)
        if decoded.unchanged and snap is not item.decoded_with:
            # somebody else wrote since: "unchanged" was judged against a stale snapshot
            decoded = decode_chats(item.body, track=True)
        present = snap.fingerprints.keys() - snap.removed
        incoming = decoded.ids

        # A list is complete unless `count` limited it or an element we could not
        # identify was rejected (that chat may be one of the "missing" ones).
        complete = instance.count is None and all(r.chat_id for r in decoded.rejected)
        protected = {r.chat_id for r in decoded.rejected if r.chat_id}
        vanished = (present - incoming - protected) if complete else set()

        anomaly = self._check_anomaly(
            conn, instance, decoded, (pending_digest, pending_streak), present, vanished, now
        )
        if anomaly is not None:
            outcome.status = "anomaly"
            outcome.error_kind, outcome.error = anomaly
            self._note_result(instance, outcome)
            self._write_run(conn, outcome, run_id, t0)
            return lambda: self._keep_snapshot(iid, snap, version)

        fingerprints = snap.fingerprints
        if not fingerprints and decoded.chats and _statements(conn.dialect.name).pg:
            return self._pg_first_load(conn, item, outcome, decoded, snap, version, run_id, now)
        if (
            prefetch is not None
            and prefetch.stored is not None
            and prefetch.snap is snap
            and decoded is item.decoded
        ):  # read with the lock, against this very snapshot (``_prefetch``)
            candidates, stored = prefetch.candidates, prefetch.stored
        else:
            candidates = _candidates(decoded, snap)
            stored = self._load_rows(
                conn, iid, [c.chat_id for c in candidates if c.chat_id in fingerprints]
            )

        inserts: list[dict[str, Any]] = []  # not in the table (the snapshot is exact)
        upserts: list[dict[str, Any]] = []
        changed_ephemeral: list[tuple[ChatRecord, int, datetime | None]] = []
        new_chats: list[ChatRecord] = []
        events: list[tuple[str, str, str | None, str | None]] = []
        for chat in candidates:
            row = stored.get(chat.chat_id)
            if row is None:
                values = self._chat_values(iid, chat, now, None)
                (upserts if chat.chat_id in fingerprints else inserts).append(values)
                new_chats.append(chat)
                events.append((chat.chat_id, "created", None, chat.name))
                outcome.chats_inserted += 1
                continue
            eph_changed = chat.ephemeral_known and (
                chat.ephemeral_expiration != row.ephemeral_expiration
                or chat.ephemeral_setting_at != row.ephemeral_setting_at
            )
            if (
                eph_changed
                or row.removed_at is not None
                or chat.name != row.name
                or chat.chat_type != row.chat_type
                or chat.archived != row.archived
            ):
                upserts.append(self._chat_values(iid, chat, now, row))
                outcome.chats_updated += 1
                if row.removed_at is not None:
                    events.append((chat.chat_id, "reappeared", None, None))
                if chat.name != row.name:
                    events.append((chat.chat_id, "renamed", row.name, chat.name))
                if chat.archived != row.archived:
                    kind = "archived" if chat.archived else "unarchived"
                    events.append(
                        (chat.chat_id, kind, str(row.archived).lower(), str(chat.archived).lower())
                    )
            if eph_changed:
                changed_ephemeral.append((chat, row.ephemeral_expiration, row.open_from))

        outcome.chats_removed = len(vanished)
        outcome.ephemeral_changes = len(changed_ephemeral)
        self._note_result(instance, outcome)
        if run_id is None:  # SQLite: the run row must exist before rows point at it
            run_id = self._write_run(conn, outcome, None, t0)
        if vanished:
            events.extend((cid, "removed", None, None) for cid in sorted(vanished))
        history, closes, starts = _history_rows(iid, run_id, now, new_chats, changed_ephemeral)
        event_rows = _event_rows(iid, run_id, now, events, changed_ephemeral, starts)
        chat_rows = inserts + upserts
        if _statements(conn.dialect.name).pg:  # one round trip for all the tick's writes
            self._finish(outcome, t0)
            outcome.sync_run_id = _pg_write_tick(
                conn,
                iid,
                now,
                chat_rows,
                sorted(vanished),
                closes,
                history,
                event_rows,
                {**outcome.row(), "id": run_id},
            )
        else:
            self._write_chats(conn, iid, inserts, upserts, vanished, now)
            self._close_history(conn, iid, closes)
            for table, part in ((history_t, history), (events_t, event_rows)):
                if part:
                    conn.execute(table.insert(), part)
            if outcome.sync_run_id is None:
                self._write_run(conn, outcome, run_id, t0)
            else:  # the row went in first (SQLite); record the real end time
                self._finish(outcome, t0)
                conn.execute(
                    update(runs_t)
                    .where(runs_t.c.id == run_id)
                    .values(finished_at=outcome.finished_at, duration_ms=outcome.duration_ms)
                )

        def commit_snapshot() -> None:
            for values in itertools.chain(inserts, upserts):
                fingerprints[values["chat_id"]] = _row_fingerprint(values)
                snap.removed.discard(values["chat_id"])
            snap.removed.update(vanished)
            snap.raw = decoded.raw_hashes or {}
            self._keep_snapshot(iid, snap, version)

        return commit_snapshot

    def _pg_first_load(
        self,
        conn: Connection,
        item: _Pending,
        outcome: SyncOutcome,
        decoded: DecodedChats,
        snap: _Snapshot,
        version: int,
        run_id: int | None,
        now: datetime,
    ) -> Callable[[], None]:
        """``_apply`` for an instance with no stored chats (PostgreSQL): every chat is new,
        so the tick is its chats, one open history row and one ``created`` event each."""
        assert run_id is not None
        iid, chats = item.instance.id_instance, decoded.chats
        outcome.chats_inserted = len(chats)
        self._note_result(item.instance, outcome)
        self._finish(outcome, item.t0)
        outcome.sync_run_id = _pg_write_first_load(
            conn, iid, now, chats, {**outcome.row(), "id": run_id}
        )

        def commit_snapshot() -> None:
            snap.fingerprints.update((c.chat_id, _chat_fingerprint(c)) for c in chats)
            snap.raw = decoded.raw_hashes or {}
            self._keep_snapshot(iid, snap, version)

        return commit_snapshot

    def _keep_snapshot(self, iid: int, snap: _Snapshot, version: int) -> None:
        snap.version = version
        self._snapshots[iid] = snap

    def forget_snapshot(self, instance_id: int) -> None:
        self._snapshots.pop(instance_id, None)

    @staticmethod
    def _bump_state(conn: Connection, iid: int, now: datetime) -> tuple[int, str | None, int]:
        """Bump the instance's state version (creating the row); return it with the streak."""
        # PostgreSQL comes here only when the instance's lock was contended (the usual
        # case bumps in ``_PG_LOCK_AND_BUMP``)
        row = conn.execute(
            _statements(conn.dialect.name).bump_state, {"iid": iid, "now": now}
        ).one()
        return int(row.version), row.pending_removal_digest, int(row.pending_removal_streak)

    @staticmethod
    def _load_snapshot(conn: Connection, iid: int) -> _Snapshot:
        snap = _Snapshot(version=0, fingerprints={}, removed=set(), raw={})
        q = select(*_STORED_CHAT).where(chats_t.c.instance_id == iid)
        for r in conn.execute(q):
            snap.fingerprints[r.chat_id] = _fingerprint(
                r.chat_type, r.name, r.archived, r.ephemeral_expiration, r.ephemeral_setting_at
            )
            if r.removed_at is not None:
                snap.removed.add(r.chat_id)
        return snap

    @staticmethod
    def _load_rows(conn: Connection, iid: int, chat_ids: list[str]) -> dict[str, Any]:
        """Stored rows (with the open history row's start) of the chats that may have changed."""
        out: dict[str, Any] = {}
        stmts = _statements(conn.dialect.name)
        for i in range(0, len(chat_ids), _READ_CHUNK):
            params = {"iid": iid, "ids": chat_ids[i : i + _READ_CHUNK]}
            if stmts.pg:
                rows = conn.exec_driver_sql(_PG_LOAD_ROWS, params)
            else:
                rows = conn.execute(stmts.load_rows, params)
            out.update({r.chat_id: r for r in rows})
        return out

    def _write_run(
        self, conn: Connection, outcome: SyncOutcome, run_id: int | None, t0: float
    ) -> int:
        self._finish(outcome, t0)
        values = outcome.row()
        if run_id is not None:
            values["id"] = run_id
        stmts = _statements(conn.dialect.name)
        if stmts.pg:
            result = pg_insert_rows(conn, "sync_runs", [values], " RETURNING id")
        else:
            result = conn.execute(stmts.insert_run, values)
        outcome.sync_run_id = int(result.scalar_one())
        return outcome.sync_run_id

    @staticmethod
    def _write_chats(
        conn: Connection,
        iid: int,
        inserts: list[dict[str, Any]],
        upserts: list[dict[str, Any]],
        vanished: set[str],
        now: datetime,
    ) -> None:
        """SQLite's chat writes (PostgreSQL's are parts of ``_pg_write_tick``)."""
        stmts = _statements(conn.dialect.name)
        if inserts:
            conn.execute(insert(chats_t), inserts)
        if upserts:
            conn.execute(stmts.upsert_chats, upserts)
        ids = sorted(vanished)
        for i in range(0, len(ids), 5000):
            conn.execute(stmts.mark_removed, {"iid": iid, "ids": ids[i : i + 5000], "now": now})

    def _check_anomaly(
        self,
        conn: Connection,
        instance: Instance,
        decoded: DecodedChats,
        pending: tuple[str | None, int],
        present: set[str],
        vanished: set[str],
        now: datetime,
    ) -> tuple[str, str] | None:
        """(error_kind, text) when this tick must not be applied; keeps the confirmation streak."""
        iid = instance.id_instance
        pending_digest, pending_streak = pending
        if decoded.received == 0:
            # an answered fetch that breaks a run of identical shrunken lists
            if pending_digest is not None:
                self._save_state(conn, iid, None, 0, now)
            return "empty_response", "getChats returned an empty list; nothing applied"
        mass = bool(present) and len(vanished) / len(present) > instance.mass_removal_threshold
        if not mass:
            if pending_digest is not None:
                self._save_state(conn, iid, None, 0, now)
            return None
        # The streak goes on while the chats that were missing last time are all still
        # missing (a real clean-up, even while new chats keep arriving) and restarts when
        # one of them comes back (a glitchy partial list). A pseudo-random sample of the
        # missing ids stands in for the set, which can be very large.
        before = _parse_vanished_sample(pending_digest)
        still_missing = before is not None and before <= vanished
        streak = pending_streak + 1 if still_missing else 1
        if streak >= instance.mass_removal_confirmations:
            self._save_state(conn, iid, None, 0, now)
            log.warning(
                "instance %s: %d of %d chats vanished and stayed missing %d times in a row; "
                "applying",
                iid,
                len(vanished),
                len(present),
                streak,
            )
            return None
        self._save_state(conn, iid, _vanished_sample(vanished), streak, now)
        return (
            "mass_removal",
            f"{len(vanished)} of {len(present)} known chats vanished at once "
            f"(threshold {instance.mass_removal_threshold:.0%}); not applied, "
            f"confirmation {streak}/{instance.mass_removal_confirmations}",
        )

    @staticmethod
    def _save_state(
        conn: Connection, iid: int, digest: str | None, streak: int, now: datetime
    ) -> None:
        conn.execute(
            update(state_t)
            .where(state_t.c.instance_id == iid)
            .values(pending_removal_digest=digest, pending_removal_streak=streak, updated_at=now)
        )

    @staticmethod
    def _chat_values(iid: int, chat: ChatRecord, now: datetime, row: Any) -> dict[str, Any]:
        if chat.ephemeral_known:
            expiration, setting_at = chat.ephemeral_expiration, chat.ephemeral_setting_at
        elif row is not None:
            expiration, setting_at = row.ephemeral_expiration, row.ephemeral_setting_at
        else:
            expiration, setting_at = 0, None
        return {
            "instance_id": iid,
            "chat_id": chat.chat_id,
            "chat_type": chat.chat_type,
            "name": chat.name,
            "archived": chat.archived,
            "ephemeral_expiration": expiration,
            "ephemeral_setting_at": setting_at,
            "first_seen_at": now,
            "updated_at": now,
            "removed_at": None,
        }

    @staticmethod
    def _close_history(conn: Connection, iid: int, closes: list[tuple[str, datetime]]) -> None:
        """End the open history rows of the chats whose setting changed (SQLite; on
        PostgreSQL a part of ``_pg_write_tick``)."""
        if closes:
            conn.execute(
                _statements(conn.dialect.name).close_history,
                [{"b_iid": iid, "b_chat_id": cid, "b_valid_to": to} for cid, to in closes],
            )


def _history_rows(
    iid: int,
    run_id: int,
    now: datetime,
    new: list[ChatRecord],
    changed: list[tuple[ChatRecord, int, datetime | None]],
) -> tuple[list[dict[str, Any]], list[tuple[str, datetime]], dict[str, datetime]]:
    """First rows for new chats, and close/open pairs for changed ones: returns the rows to
    insert, the (chat_id, valid_to) of the rows to close, and each chat's new ``valid_from``."""
    rows: list[dict[str, Any]] = []
    starts: dict[str, datetime] = {}
    closes: list[tuple[str, datetime]] = []
    work = [(c, None) for c in new] + [(c, open_from) for c, _, open_from in changed]
    for chat, previous in work:
        valid_from = choose_valid_from(chat.ephemeral_setting_at, previous, now)
        starts[chat.chat_id] = valid_from
        if previous is not None:
            closes.append((chat.chat_id, valid_from))
        rows.append(
            {
                "instance_id": iid,
                "chat_id": chat.chat_id,
                "ephemeral_expiration": chat.ephemeral_expiration or 0,
                "ephemeral_setting_at": chat.ephemeral_setting_at,
                "valid_from": valid_from,
                "valid_to": None,
                "sync_run_id": run_id,
            }
        )
    return rows, closes, starts


def _event_rows(
    iid: int,
    run_id: int,
    now: datetime,
    events: list[tuple[str, str, str | None, str | None]],
    changed_ephemeral: list[tuple[ChatRecord, int, datetime | None]],
    starts: dict[str, datetime],
) -> list[dict[str, Any]]:
    rows = [
        {
            "instance_id": iid,
            "chat_id": cid,
            "event_type": kind,
            "old_value": old,
            "new_value": new,
            "occurred_at": now,
            "sync_run_id": run_id,
        }
        for cid, kind, old, new in events
    ]
    rows.extend(
        {
            "instance_id": iid,
            "chat_id": chat.chat_id,
            "event_type": "ephemeral_changed",
            "old_value": str(old_expiration),
            "new_value": str(chat.ephemeral_expiration),
            "occurred_at": starts[chat.chat_id],
            "sync_run_id": run_id,
        }
        for chat, old_expiration, _ in changed_ephemeral
    )
    return rows


def _pg_write_tick(
    conn: Connection,
    iid: int,
    now: datetime,
    chat_rows: list[dict[str, Any]],
    vanished: list[str],
    closes: list[tuple[str, datetime]],
    history: list[dict[str, Any]],
    events: list[dict[str, Any]],
    run: dict[str, Any],
) -> int:
    """A tick's writes on PostgreSQL in one statement: data-modifying CTEs for the chats
    upsert, the removals, the history closes and new history rows, the events and the
    ``sync_runs`` row (returns its id). Big ticks too: at 30 % of 200 x 500 chats changing
    per tick this took 1.15 s a tick against 1.82 s for COPY and multi-row ``VALUES``
    (process CPU 0.64 against 1.34 s).

    The parts of one statement run in no set order, but one open history row per chat is
    a unique index checked row by row: so the new rows' ``SELECT`` waits on the count of
    the closed ones (an InitPlan, run to completion before the first row is inserted), and
    a closed row, updated by this very transaction, is no longer a conflict. Folding the
    closes in saved a round trip in the ~70 % of steady ticks that have one.
    The foreign keys from history and events to new chats are checked at the statement's
    end, when the chats are in."""
    w = _PgWrite()

    def rows_of(name: str, table: Table, rows: list[dict[str, Any]], suffix: str) -> None:
        if rows:
            columns = tuple(rows[0])
            sql = pg_json_insert_sql(table, columns, suffix)
            w.add(name, table.name, f"{sql} RETURNING 1", pg_json_rows(rows))

    rows_of("c", chats_t, chat_rows, _PG_UPSERT_CHATS_SUFFIX)
    if vanished:
        w.add("r", "chats", f"{_PG_MARK_REMOVED} RETURNING 1", now, now, iid, vanished)
    after_closes = ""
    if closes:
        rows = pg_json_rows([{"chat_id": cid, "valid_to": to} for cid, to in closes])
        w.add("k", "chat_ephemeral_history", _PG_CLOSE_HISTORY, rows, iid)
        after_closes = " WHERE (SELECT count(*) FROM k) >= 0"
    rows_of("h", history_t, history, after_closes)
    rows_of("e", events_t, events, "")
    return w.execute(conn, run)


#: the chats of a first load, as one JSON parameter (``ChatRecord``s as orjson dumps them)
_PG_FIRST_LOAD_CHATS = """
SELECT * FROM json_to_recordset(%s::json) AS x (
  chat_id text, chat_type text, name text, archived boolean,
  ephemeral_expiration integer, ephemeral_setting_at timestamptz)
"""
#: parameters: instance id, now, now
_PG_FIRST_LOAD_INSERT_CHATS = """
INSERT INTO chats (instance_id, chat_id, chat_type, name, archived, ephemeral_expiration,
                   ephemeral_setting_at, first_seen_at, updated_at, removed_at)
SELECT %s, chat_id, chat_type, name, archived, COALESCE(ephemeral_expiration, 0),
       ephemeral_setting_at, %s, %s, NULL FROM v RETURNING 1
"""
#: parameters: instance id, now + MAX_CLOCK_SKEW, now, run id. ``valid_from`` is
#: ``choose_valid_from(ephemeral_setting_at, None, now)``, in SQL
_PG_FIRST_LOAD_HISTORY = """
INSERT INTO chat_ephemeral_history (instance_id, chat_id, ephemeral_expiration,
                                    ephemeral_setting_at, valid_from, valid_to, sync_run_id)
SELECT %s, chat_id, COALESCE(ephemeral_expiration, 0), ephemeral_setting_at,
       CASE WHEN ephemeral_setting_at <= %s THEN ephemeral_setting_at ELSE %s END, NULL, %s
FROM v RETURNING 1
"""
#: parameters: instance id, now, run id
_PG_FIRST_LOAD_EVENTS = """
INSERT INTO chat_events (instance_id, chat_id, event_type, old_value, new_value,
                         occurred_at, sync_run_id)
SELECT %s, chat_id, 'created', NULL, name, %s, %s FROM v RETURNING 1
"""


def _pg_write_first_load(
    conn: Connection, iid: int, now: datetime, chats: list[ChatRecord], run: dict[str, Any]
) -> int:
    """The first load of an instance on PostgreSQL in one statement: the chats go once, as
    one JSON text that orjson dumps in C straight from the ``ChatRecord``s, and the
    database derives the chats, history and event rows from it. With three COPYs of rows
    built in Python, this process spent 7 CPU-s more than the floor on a 1,000 x 500
    first load, most of it in psycopg formatting 1.5 M rows (see docs/benchmarks.md)."""
    run_id = run["id"]
    w = _PgWrite()
    w.add("v", None, f"MATERIALIZED ({_PG_FIRST_LOAD_CHATS})", orjson.dumps(chats).decode())
    w.add("c", "chats", _PG_FIRST_LOAD_INSERT_CHATS, iid, now, now)
    w.add(
        "h",
        "chat_ephemeral_history",
        _PG_FIRST_LOAD_HISTORY,
        iid,
        now + MAX_CLOCK_SKEW,
        now,
        run_id,
    )
    w.add("e", "chat_events", _PG_FIRST_LOAD_EVENTS, iid, now, run_id)
    return w.execute(conn, run)


class _PgWrite:
    """One statement of data-modifying CTEs ending with the ``sync_runs`` row; reports the
    rows each part wrote to ``written_listeners``."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.params: list[Any] = []
        self.counted: list[tuple[str, str]] = []

    def add(self, name: str, table: str | None, sql: str, *params: Any) -> None:
        """A part ``name AS (sql)`` (``sql`` may start with MATERIALIZED); ``table``: the
        table whose written rows it returns, one row each (None: not counted)."""
        body = sql if sql.startswith("MATERIALIZED") else f"({sql})"
        self.parts.append(f"{name} AS {body}")
        self.params.extend(params)
        if table is not None:
            self.counted.append((name, table))

    def execute(self, conn: Connection, run: dict[str, Any]) -> int:
        """Run the statement with ``run`` as its ``sync_runs`` row; returns the run's id."""
        columns = tuple(run)
        self.add("s", "sync_runs", pg_values_sql("sync_runs", columns, 1, " RETURNING id"))
        self.params.extend(run[c] for c in columns)
        # the names are this module's own; every value goes as a bind parameter
        counts = "".join(f", (SELECT count(*) FROM {n})" for n, _ in self.counted)  # noqa: S608
        sql = f"WITH {', '.join(self.parts)} SELECT (SELECT id FROM s){counts}"  # noqa: S608
        row = conn.exec_driver_sql(sql, tuple(self.params)).one()
        for (_, table), n in zip(self.counted, row[1:], strict=True):
            for listener in written_listeners:
                listener(table, int(n))
        return int(row[0])


@dataclass(slots=True, eq=False)
class _Pending:
    """A fetched and decoded tick waiting for its write (see ``Syncer._group_write``)."""

    instance: Instance
    decoded: DecodedChats
    body: bytes
    decoded_with: _Snapshot | None
    #: the fetch's outcome (started_at, http_status, attempts)
    fetched: SyncOutcome
    t0: float
    #: held while the tick waits in the queue (see ``Syncer._group_write``)
    wake: threading.Lock | None = None
    #: set once written: the tick's outcome, or what the writing thread raised
    result: SyncOutcome | BaseException | None = None


@dataclass(slots=True, eq=False)
class _Prefetch:
    """A steady tick's read-back, sent with the lock (``Syncer._prefetch``)."""

    snap: _Snapshot
    candidates: list[ChatRecord]
    read_ids: list[str]
    stored: dict[str, Any] | None = None


def _candidates(decoded: DecodedChats, snap: _Snapshot) -> list[ChatRecord]:
    """The decoded chats that may differ from what ``snap`` says is stored."""
    fingerprints = snap.fingerprints
    return [
        c
        for c in decoded.chats
        if not c.ephemeral_known
        or c.chat_id in snap.removed
        or fingerprints.get(c.chat_id) != _chat_fingerprint(c)
    ]


@dataclass(slots=True)
class _Snapshot:
    """What this process last committed for one instance: one fingerprint per chat."""

    version: int
    fingerprints: dict[str, int]
    removed: set[str]
    #: ``DecodedChats.raw_hashes`` of the last list applied: its unchanged elements are
    #: not decoded again
    raw: dict[int, str]


def _fingerprint(
    chat_type: str, name: str, archived: bool, expiration: int, setting_at: datetime | None
) -> int:
    return hash((chat_type, name, bool(archived), expiration, setting_at))


def _chat_fingerprint(chat: ChatRecord) -> int:
    return _fingerprint(
        chat.chat_type,
        chat.name,
        chat.archived,
        chat.ephemeral_expiration or 0,
        chat.ephemeral_setting_at,
    )


def _row_fingerprint(values: dict[str, Any]) -> int:
    return _fingerprint(
        values["chat_type"],
        values["name"],
        values["archived"],
        values["ephemeral_expiration"],
        values["ephemeral_setting_at"],
    )

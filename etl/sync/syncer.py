"""One instance's sync: fetch -> decode -> identify -> plan -> store -> listeners.

The HTTP fetch happens outside any database transaction, and so do the checkWhatsapp
lookups an id switch needs (``linking``). The write transaction locks the instance and
bumps its state (``Store.lock``), maps the list's ids to the stored chats and judges an id
switch (``identity``), judges the list (``guards``), plans the writes against what is
stored (``plan``) and hands them to the store, which writes the chats, the history, the
events, the ids and the ``sync_runs`` row together: all of it or none. Ticks that queue
up behind a write are written together (``group_commit``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.client import GreenApiClient
from etl.clock import utcnow
from etl.config import Instance
from etl.errors import ApiError, ErrorKind, SyncError
from etl.payload import DecodedChats, decode_chats
from etl.redact import redact
from etl.sync.failures import FailureLog, log_failure
from etl.sync.group_commit import GroupCommit, Queued
from etl.sync.guards import CLEAR, Verdict, judge
from etl.sync.health import HealthBook, restore_backoff
from etl.sync.identify import Identified, IdStep, notes_text
from etl.sync.identity import Identity, translate
from etl.sync.linking import Linker
from etl.sync.outcome import SyncOutcome, log_outcome
from etl.sync.plan import (
    FirstLoad,
    IdChange,
    TickPlan,
    add_id_changes,
    plan_tick,
    vanished_chats,
)
from etl.sync.snapshot import (
    PackedSnapshot,
    Snapshot,
    SnapshotCache,
    decoder_tag,
    preload,
    preload_ahead,
)
from etl.sync.store import Claim, Locked, SnapshotWrite, TickState, store_for
from etl.sync.tick import Pending, Prefetch

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")

#: the most ticks written in one transaction (group commit)
GROUP_LIMIT = 32
#: how many groups are written at once (see ``etl.sync.group_commit``; the figures behind
#: this number are in docs/benchmarks.md)
GROUP_WRITERS = 4
#: snapshots written per statement by ``persist_held`` (about 35 bytes a chat each)
PERSIST_CHUNK = 100


class Syncer:
    """Runs syncs; safe to call from many threads. One sync per instance at a time."""

    def __init__(
        self,
        engine: Engine,
        client: GreenApiClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        compact_snapshots: bool = False,
        persist_snapshots: bool | None = None,
        persist_every: int = 0,
    ) -> None:
        self.engine = engine
        self.client = client
        self.clock = clock
        self.store = store_for(engine.dialect.name)
        self.health = HealthBook(monotonic)
        self.snapshots = SnapshotCache(compact=compact_snapshots)
        #: whether each tick writes its instance's snapshot into ``instance_snapshots``
        #: (default: when kept compact, where the packed form is at hand anyway)
        self.persist = compact_snapshots if persist_snapshots is None else persist_snapshots
        #: otherwise, each instance's every ``persist_every``-th tick writes it (0: none),
        #: staggered across the instances; a snapshot some ticks old is topped up from the
        #: rows written since by whoever reads it (``Snapshot.topped_up``)
        self.persist_every = persist_every
        #: checkWhatsapp lookups for the ids of an id switch
        self.linker = Linker(client)
        self.ids = IdStep(engine, self.store, self.snapshots, self.linker, clock)
        #: failed ticks: recorded, or kept while the database is unreachable
        self.failures = FailureLog(engine, self.store, self.health, clock)
        self.group: GroupCommit[Pending, SyncOutcome] = GroupCommit(
            self._write_group, limit=GROUP_LIMIT, writers=GROUP_WRITERS
        )
        #: called with every finished outcome (metrics, status); errors are logged, not raised
        self.listeners: list[Callable[[Instance, SyncOutcome], None]] = []
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def group_sizes(self) -> Counter[int]:
        """How many groups of each size were written (tests and benchmarks read it)."""
        return self.group.sizes

    def due(self, instance: Instance) -> bool:
        """False while the instance is backing off after failures (the daemon skips it)."""
        return self.health.due(instance)

    def consecutive_failures(self, instance_id: int) -> int:
        return self.health.consecutive_failures(instance_id)

    def restore_backoff(
        self, instances: Sequence[Instance]
    ) -> dict[int, tuple[datetime | None, int]]:
        """Resume each instance's backoff from its state row, after a restart
        (``health.restore_backoff``)."""
        return restore_backoff(self.engine, self.store, self.health, instances, self.clock())

    def adopt(
        self,
        instance: Instance,
        failures: int,
        kind: str | None,
        next_due_at: datetime | None,
        now: datetime,
    ) -> None:
        """Take an instance over as its state row says: failures in a row, next due time."""
        self.health.restore(instance, failures, kind, next_due_at, now)

    def syncing(self, instance_id: int) -> bool:
        """Whether a tick of the instance is running in this process now."""
        lock = self._locks.get(instance_id)
        return lock is not None and lock.locked()

    def forget_snapshot(self, instance_id: int) -> None:
        self.snapshots.forget(instance_id)

    def preload(self, instances: Sequence[Instance]) -> int:
        """Read the persisted snapshots of instances new to this process
        (``snapshot.preload``); returns how many were usable."""
        return preload(self.engine, self.store, self.snapshots, instances)

    def preload_ahead(self, instances: Sequence[Instance]) -> threading.Thread:
        """``preload`` on a thread of its own, ahead of the ticks (``snapshot.preload``)."""
        return preload_ahead(self.engine, self.store, self.snapshots, instances)

    def persist_held(
        self, instance_ids: Iterable[int] | None = None, *, deadline: float | None = None
    ) -> int:
        """Write the snapshots this process keeps of ``instance_ids`` (default: all of
        them) that ``instance_snapshots`` does not hold yet, for whoever syncs those
        instances next: a daemon that stops, or hands instances to another replica, leaves
        them so that their next first tick costs a steady one, not a rebuild from the rows.
        Stops at ``deadline`` (``time.monotonic()``); returns how many it wrote. Raises
        SQLAlchemyError; what was written before stays (each chunk commits)."""
        ids = self.snapshots.ids() if instance_ids is None else list(instance_ids)
        written = 0
        for start in range(0, len(ids), PERSIST_CHUNK):
            if deadline is not None and time.monotonic() >= deadline:
                log.info("wrote %d of %d snapshots before the deadline", written, len(ids))
                break
            writes = []
            for iid in ids[start : start + PERSIST_CHUNK]:
                held = self.snapshots.unpersisted(iid)
                if held is not None:
                    version, floor, packed = held
                    data = packed.to_bytes()
                    writes.append(SnapshotWrite(iid, version, data, self.clock(), floor))
            if not writes:
                continue
            with self.engine.begin() as conn:
                self.store.save_snapshots(conn, writes)
            for w in writes:
                self.snapshots.mark_persisted(w.instance_id, w.version)
            written += len(writes)
        return written

    def _snapshot(self, instance: Instance) -> Snapshot | None:
        """The instance's snapshot for this tick: this process's, else the persisted one
        (a tick of an instance that was not preloaded), else None."""
        snap = self.snapshots.get(instance.id_instance)
        if snap is not None:
            return snap
        try:
            self.preload([instance])  # not read ahead (yet)
        except SQLAlchemyError:
            return None  # the write finds out, and records it
        return self.snapshots.get(instance.id_instance)

    def release(self, instance_id: int) -> None:
        """Forget what this process keeps of an instance (another replica owns it now)."""
        self.snapshots.forget(instance_id)
        self.health.forget(instance_id)

    # -- one tick ------------------------------------------------------------------------

    def sync(self, instance: Instance, claim: Claim | None = None) -> SyncOutcome:
        """One tick of ``instance``; ``claim``: the lease it is made under, whose loss
        makes the store refuse its writes (several replicas)."""
        lock = self._lock_for(instance.id_instance)
        if not lock.acquire(blocking=False):
            log.warning(
                "instance %s: previous sync still running, skipping this tick",
                instance.id_instance,
            )
            return SyncOutcome(instance.id_instance, "skipped", self.clock())
        try:
            outcome = self._sync(instance, claim)
        finally:
            self.snapshots.settle(instance.id_instance)
            lock.release()
        for listener in self.listeners:
            try:
                listener(instance, outcome)
            except Exception:
                log.exception("sync listener failed")
        return outcome

    def _lock_for(self, instance_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(instance_id, threading.Lock())

    def _sync(self, instance: Instance, claim: Claim | None) -> SyncOutcome:
        outcome = SyncOutcome(instance.id_instance, "ok", self.clock())
        pending = self._fetch(instance, outcome, time.monotonic(), claim)
        if pending is None:
            return outcome
        outcome = self.group.submit(pending)
        if outcome.error_kind == ErrorKind.LEASE_LOST:
            log_failure(outcome)  # its run row is written, nothing else
            return outcome
        if outcome.status == "failed":
            self._write_failure(instance, outcome, claim)
            return outcome
        log_outcome(outcome)
        self.flush_unrecorded()
        return outcome

    def _fetch(
        self, instance: Instance, outcome: SyncOutcome, t0: float, claim: Claim | None
    ) -> Pending | None:
        """Fetch and decode; a failure is recorded at once (and None returned)."""
        try:
            fetched = self.client.get_chats(instance)
            outcome.attempts = fetched.attempts
            outcome.http_status = fetched.http_status
            # elements identical to the last list this process applied skip validation
            decoded_with = self._snapshot(instance)
            known, body = (None, 0)
            if decoded_with is not None:
                known, body = decoded_with.known_for(instance.platform)
            decoded = decode_chats(
                fetched.body,
                known=known,
                known_body=body,
                track=True,
                platform=instance.platform,
            )
        except SyncError as exc:
            outcome.status = "failed"
            outcome.error_kind = exc.error_kind
            outcome.http_status = exc.http_status
            outcome.attempts = exc.attempts or outcome.attempts
            outcome.error = redact(exc.message)
            if isinstance(exc, ApiError):
                outcome.instance_state = exc.instance_state
            self._finish(outcome, t0)
            self.health.note(instance, outcome)
            self._write_failure(instance, outcome, claim)
            return None
        snap = decoded_with or self.ids.read_snapshot(instance)
        asked = self.ids.ask_links(instance, decoded, snap, t0)
        return Pending(instance, decoded, fetched.body, decoded_with, outcome, t0, asked, claim)

    # -- the write -----------------------------------------------------------------------

    def _write_group(self, batch: list[Queued[Pending, SyncOutcome]]) -> None:
        """Write the ticks of ``batch``: together in one transaction, or one by one when
        that transaction failed on a statement (so one bad tick still fails alone)."""
        if len(batch) > 1 and self._write_together(batch):
            return
        for queued in batch:
            queued.done(self._write_alone(queued.item))

    def _write_together(self, batch: list[Queued[Pending, SyncOutcome]]) -> bool:
        """False when the group must be written again tick by tick."""
        began = False
        # one order for every group: two replicas' groups never wait on each other
        ordered = sorted(batch, key=lambda q: q.item.instance.id_instance)
        try:
            with self.engine.begin() as conn:
                began = True
                written = [self._write_tick(conn, q.item) for q in ordered]
        except SQLAlchemyError as exc:
            if not began or getattr(exc, "connection_invalidated", False):
                # the database is unreachable: each tick alone would fail the same way
                for queued in batch:
                    queued.done(self._database_failure(queued.item, exc))
                return True
            log.info(
                "a group of %d ticks failed (%s); writing them one by one",
                len(batch),
                type(exc).__name__,
            )
            return False
        for queued, (outcome, after_commit) in zip(ordered, written, strict=True):
            after_commit()
            queued.done(outcome)
        return True

    def _write_alone(self, item: Pending) -> SyncOutcome:
        try:
            with self.engine.begin() as conn:
                outcome, after_commit = self._write_tick(conn, item)
            after_commit()
        except SQLAlchemyError as exc:
            outcome = self._database_failure(item, exc)
        return outcome

    def _write_tick(
        self, conn: Connection, item: Pending
    ) -> tuple[SyncOutcome, Callable[[], None]]:
        """Apply one tick inside ``conn``'s transaction (a fresh outcome per attempt);
        returns it with what to do once the transaction has committed."""
        fetched = item.fetched
        outcome = SyncOutcome(
            fetched.instance_id,
            "ok",
            fetched.started_at,
            http_status=fetched.http_status,
            attempts=fetched.attempts,
        )
        now = self.clock()
        prefetch = self._prefetch(item)
        read_ids = prefetch.read_ids if prefetch is not None else None
        interval = timedelta(seconds=item.instance.interval_seconds)
        state = TickState(due=fetched.started_at + interval, claim=item.claim)
        locked = self.store.lock(conn, item.instance.id_instance, now, read_ids, state)
        if locked.fenced:
            return outcome, self._write_lost(conn, item, outcome, locked)
        return outcome, self._apply(conn, item, outcome, locked, now, prefetch)

    def _prefetch(self, item: Pending) -> Prefetch | None:
        """The chats to read back, judged against the cached snapshot before the lock, so
        that the read rides on the lock's round trip (steady state, where the store can)."""
        snap = self.snapshots.get(item.instance.id_instance)
        if (
            not self.store.reads_with_lock
            or snap is None
            or not snap.fingerprints  # nothing stored to read back (a first load)
            or (item.decoded.unchanged and snap is not item.decoded_with)
        ):
            return None
        decoded, changes = translate(item.decoded, snap.identity, snap.fingerprints)
        candidates = snap.candidates(decoded)
        ids = [c.chat_id for c in candidates if c.chat_id in snap.fingerprints]
        if not ids or len(ids) > self.store.read_chunk:
            return None
        return Prefetch(snap, candidates, ids, decoded, changes)

    def _apply(
        self,
        conn: Connection,
        item: Pending,
        outcome: SyncOutcome,
        locked: Locked,
        now: datetime,
        prefetch: Prefetch | None,
    ) -> Callable[[], None]:
        """Judge, plan and write one tick, the instance locked; returns what to do once
        the transaction has committed."""
        instance, iid = item.instance, item.instance.id_instance
        snap = self.snapshots.get_current(iid, locked.version)
        if snap is None:  # new to this process, or another writer wrote since
            snap = self.store.load_stored(conn, iid)
        decoded, changes = self._decoded(item, snap, prefetch)
        outcome.chats_received = decoded.received
        outcome.chats_rejected = len(decoded.rejected)
        present = snap.present()
        ident = self.ids.identify(conn, item.instance, item.asked, snap, present, decoded, changes)
        if ident.hold is not None:
            verdict = Verdict(ErrorKind.ID_SWITCH, ident.hold)
            return self._write_anomaly(conn, item, outcome, locked, verdict, snap, ident)
        decoded = ident.decoded

        vanished = vanished_chats(present, decoded, count_limited=instance.count is not None)
        verdict = self._judge(instance, decoded, present, vanished, locked, ident)
        if verdict.save is not None:
            self.store.save_guard_state(conn, iid, verdict.save, now)
        if verdict.confirmed is not None:
            log.warning("instance %s: %s", iid, verdict.confirmed)
        if verdict.anomaly is not None:
            return self._write_anomaly(conn, item, outcome, locked, verdict, snap, ident)

        plan = self._plan(conn, item, decoded, snap, vanished, now, locked, prefetch)
        if isinstance(plan, TickPlan) and ident.changes:
            add_id_changes(plan, ident.changes)
        counts = plan.counts
        outcome.chats_inserted, outcome.chats_updated = counts.inserted, counts.updated
        outcome.chats_removed, outcome.ephemeral_changes = counts.removed, counts.ephemeral_changes
        outcome.ids_changed, outcome.error = counts.ids_changed, notes_text(decoded)
        self.health.note(instance, outcome)
        aliases = {**ident.aliases, **ident.late}
        identity = snap.identity.after(ident.changes, aliases)
        new, packed, saved = self._write_plan(
            conn, item, outcome, locked, plan, snap, decoded, identity
        )
        if aliases or ident.changes:
            self.store.write_identity(conn, iid, ident.changes, aliases, now)
        return self._keep(iid, new, packed, locked, saved)

    def _keep(
        self,
        iid: int,
        new: Snapshot,
        packed: PackedSnapshot | None,
        locked: Locked,
        saved: SnapshotWrite | None,
    ) -> Callable[[], None]:
        """What to keep of the instance once the tick's transaction has committed."""
        return functools.partial(
            self.snapshots.keep_after,
            iid,
            new,
            packed,
            locked.version,
            persisted=saved is not None,
            floor=locked.floor,
        )

    def _write_plan(
        self,
        conn: Connection,
        item: Pending,
        outcome: SyncOutcome,
        locked: Locked,
        plan: TickPlan | FirstLoad,
        snap: Snapshot,
        decoded: DecodedChats,
        identity: Identity,
    ) -> tuple[Snapshot, PackedSnapshot | None, SnapshotWrite | None]:
        """Write a planned tick with its run row (and persisted snapshot); returns the
        snapshot as the tick leaves it, its packed form if one was made, and its write."""
        iid = item.instance.id_instance
        run = functools.partial(self._run_row, outcome, item.t0)
        tag = decoder_tag(item.instance.platform)
        if isinstance(plan, FirstLoad):
            new = snap.after_first_load(plan.chats, decoded, tag, identity)
            packed, saved = self._persisted(iid, locked, snap, new)
            outcome.sync_run_id = self.store.write_first_load(conn, locked, plan, run, saved)
            return new, packed, saved
        unchanged = (
            not plan.chat_rows
            and not plan.removed
            and identity is snap.identity
            and decoded.body_hash == snap.body_hash != 0
            and tag == snap.tag
        )
        if unchanged:
            new = snap
        else:
            new = snap.after_write(plan.chat_rows, plan.removed, decoded, tag, identity)
        packed, saved = self._persisted(iid, locked, snap, new)
        outcome.sync_run_id = self.store.write_tick(conn, locked, plan, run, saved)
        return new, packed, saved

    def _persisted(
        self, iid: int, locked: Locked, snap: Snapshot, new: Snapshot
    ) -> tuple[PackedSnapshot | None, SnapshotWrite | None]:
        """The packed form of ``new`` and its write into ``instance_snapshots`` (none when
        this tick does not persist): only the version moves on when ``new`` is the
        snapshot persisted before."""
        if not self._persists(iid, locked.version, changed=new is not snap):
            return None, None
        # an unchanged snapshot read from its packed form is packed already
        packed = snap.source if new is snap and snap.source is not None else new.packed()
        data = None if new is snap and snap.persisted else packed.to_bytes()
        return packed, SnapshotWrite(iid, locked.version, data, self.clock(), locked.floor)

    def _persists(self, iid: int, version: int, *, changed: bool) -> bool:
        """Whether the tick that leaves ``version`` writes the instance's snapshot: every
        tick (``persist``), or one in ``persist_every``, the instances taking turns (by
        id) so that the writes spread over the ticks instead of coming all at once, and
        any tick while the table holds none to top up (a first load, a rebuild).

        A turn that comes at a tick that changed nothing passes to the next tick that
        does: the snapshot in the table is no further behind in rows than before (its
        reader tops it up from the same rows), so writing it would cost a no-change tick
        and save nobody anything."""
        if self.persist:
            return True
        every = self.persist_every
        if every <= 0:
            return False
        if not self.snapshots.based(iid):
            return True
        due = (version + iid) % every == 0 or self.snapshots.owed(iid)
        if due and not changed:
            self.snapshots.owe(iid)
        return due and changed

    def _decoded(
        self, item: Pending, snap: Snapshot, prefetch: Prefetch | None
    ) -> tuple[DecodedChats, list[IdChange]]:
        """The list with its ids mapped to ``snap``'s chats, and the chats seen under
        another id than the one in use."""
        decoded = item.decoded
        if decoded.unchanged and snap is not item.decoded_with:
            # somebody else wrote since: "unchanged" was judged against a stale snapshot
            decoded = decode_chats(item.body, track=True, platform=item.instance.platform)
        elif prefetch is not None and prefetch.snap is snap:
            return prefetch.decoded, prefetch.changes
        return translate(decoded, snap.identity, snap.fingerprints)

    @staticmethod
    def _judge(
        instance: Instance,
        decoded: DecodedChats,
        present: set[str],
        vanished: set[str],
        locked: Locked,
        ident: Identified,
    ) -> Verdict:
        """The guards; an id switch the operator accepted is not a mass removal."""
        if ident.accepted:
            return Verdict(save=CLEAR if locked.guard.sample is not None else None)
        return judge(
            instance,
            received=decoded.received,
            present=present,
            vanished=vanished,
            stored=locked.guard,
        )

    def _plan(
        self,
        conn: Connection,
        item: Pending,
        decoded: DecodedChats,
        snap: Snapshot,
        vanished: set[str],
        now: datetime,
        locked: Locked,
        prefetch: Prefetch | None,
    ) -> TickPlan | FirstLoad:
        """The tick's writes: every chat of a first load, else the chats whose
        fingerprint differs from the snapshot's, compared with their stored rows."""
        iid = item.instance.id_instance
        history = item.instance.platform == "whatsapp"  # the others have no such setting
        if not snap.fingerprints and decoded.chats:
            return FirstLoad(iid, now, decoded.chats, history)
        if (
            prefetch is not None
            and locked.stored is not None
            and prefetch.snap is snap
            and decoded is prefetch.decoded
        ):  # read with the lock, against this very snapshot (``_prefetch``)
            candidates, stored = prefetch.candidates, locked.stored
        else:
            candidates = snap.candidates(decoded)
            in_table = [c.chat_id for c in candidates if c.chat_id in snap.fingerprints]
            stored = self.store.load_rows(conn, iid, in_table)
        return plan_tick(
            instance_id=iid,
            candidates=candidates,
            stored=stored,
            in_table=snap.fingerprints,
            vanished=vanished,
            now=now,
            history=history,
        )

    def _write_anomaly(
        self,
        conn: Connection,
        item: Pending,
        outcome: SyncOutcome,
        locked: Locked,
        verdict: Verdict,
        snap: Snapshot,
        ident: Identified,
    ) -> Callable[[], None]:
        """A tick held back (the guards, or an id switch not linked): only its run row is
        written, and the ids checkWhatsapp gave for chats that exist (facts, kept so that
        they are not asked again)."""
        outcome.status = "anomaly"
        outcome.error_kind, outcome.error = verdict.anomaly, verdict.message
        self.health.note(item.instance, outcome)
        row = self._run_row(outcome, item.t0)
        iid = item.instance.id_instance
        new = snap.with_identity(snap.identity.after([], ident.aliases))
        packed, saved = self._persisted(iid, locked, snap, new)
        outcome.sync_run_id = self.store.write_run(conn, locked, row, saved)
        if ident.aliases:
            self.store.write_identity(conn, iid, [], ident.aliases, self.clock())
        return self._keep(iid, new, packed, locked, saved)

    def _write_lost(
        self, conn: Connection, item: Pending, outcome: SyncOutcome, locked: Locked
    ) -> Callable[[], None]:
        """A tick whose claim another replica has taken since: its run row says so, and
        nothing else is written (the new owner syncs the instance now)."""
        claim = item.claim
        assert claim is not None  # only a claimed tick is fenced
        outcome.status, outcome.error_kind = "failed", ErrorKind.LEASE_LOST
        outcome.chats_received = item.decoded.received
        outcome.error = (
            f"the lease this tick was made under (epoch {claim.epoch}) is no longer held by "
            "this replica: another replica took the instance over; nothing applied"
        )
        row = self._run_row(outcome, item.t0)
        outcome.sync_run_id = self.store.write_run(conn, locked, row)
        iid = item.instance.id_instance
        return functools.partial(self.release, iid)

    def _run_row(self, outcome: SyncOutcome, t0: float) -> dict[str, Any]:
        """The outcome's ``sync_runs`` row, ending now."""
        self._finish(outcome, t0)
        return outcome.row()

    def _finish(self, outcome: SyncOutcome, t0: float) -> None:
        outcome.finished_at = self.clock()
        outcome.duration_ms = int((time.monotonic() - t0) * 1000)

    # -- failures ------------------------------------------------------------------------

    def _database_failure(self, item: Pending, exc: SQLAlchemyError) -> SyncOutcome:
        """The failed outcome of a tick whose transaction failed (not yet recorded)."""
        self.snapshots.forget(item.instance.id_instance)
        orig = getattr(exc, "orig", None) or exc
        outcome = SyncOutcome(
            item.instance.id_instance,
            "failed",
            item.fetched.started_at,
            http_status=item.fetched.http_status,
            attempts=item.fetched.attempts,
            chats_received=item.decoded.received,
            error_kind=ErrorKind.DATABASE,
            error=redact(f"{type(orig).__name__}: {str(orig)[:500]}"),
        )
        self._finish(outcome, item.t0)
        self.health.note(item.instance, outcome)
        return outcome

    def _write_failure(self, instance: Instance, outcome: SyncOutcome, claim: Claim | None) -> None:
        self.failures.write(instance, outcome, claim)

    def defer_failure(self, outcome: SyncOutcome, reason: str) -> None:
        """A failed tick that cannot be written now (``FailureLog.defer``)."""
        self.failures.defer(outcome, reason)

    def unreachable_outcome(self, instance: Instance, error: str) -> SyncOutcome:
        """A tick that never started because the database could not be reached."""
        return self.failures.unreachable(instance, error)

    def flush_unrecorded(self) -> int:
        """Write the failed ticks kept while the database was away; returns how many."""
        return self.failures.flush()

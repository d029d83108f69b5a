"""APScheduler wiring: one interval job per instance, staggered start, graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import SQLAlchemyError

from etl.clock import utcnow
from etl.config import Instance, RetentionSettings
from etl.errors import ErrorKind
from etl.leases import Held, LeaseManager
from etl.metrics import Metrics
from etl.retention import prune_sync_runs
from etl.sync import Syncer, SyncOutcome
from etl.sync.store import Claim

log = logging.getLogger(__name__)


def stagger_offsets(instances: Sequence[Instance], spread: float | None = None) -> dict[int, float]:
    """Spread first runs evenly over ``spread`` seconds (None: each instance's interval,
    per interval) so that a fleet does not fire at once."""
    by_interval: dict[int, list[Instance]] = {}
    for inst in instances:
        by_interval.setdefault(inst.interval_seconds, []).append(inst)
    offsets: dict[int, float] = {}
    for interval, group in by_interval.items():
        window = interval if spread is None else min(spread, interval)
        for i, inst in enumerate(group):
            offsets[inst.id_instance] = window * i / len(group)
    return offsets


def _late(held: Held, now: datetime) -> bool:
    """Due already, or never synced."""
    return held.next_due_at is None or held.next_due_at <= now


class Daemon:
    """Runs every enabled instance this process owns on its interval until ``stop()`` or a
    signal. Alone (SQLite) it owns them all; with several replicas on PostgreSQL, the
    ones its ``LeaseManager`` has claimed: jobs come and go with the leases."""

    def __init__(
        self,
        *,
        syncer: Syncer,
        instances: Sequence[Instance],
        max_workers: int = 8,
        shutdown_timeout: float = 30.0,
        leases: LeaseManager | None = None,
        metrics: Metrics | None = None,
        retention: RetentionSettings | None = None,
        liveness_seconds: float = 5.0,
        persist_on_release: bool = True,
    ) -> None:
        self.syncer = syncer
        self.instances = [i for i in instances if i.enabled]
        self.by_id = {i.id_instance: i for i in self.instances}
        self.leases = leases if leases is not None else LeaseManager(syncer.engine, self.instances)
        self.shutdown_timeout = shutdown_timeout
        #: write the snapshots of the instances this daemon lets go (it stops, or hands
        #: them to another replica), so that whoever syncs them next starts from them
        self.persist_on_release = persist_on_release
        self.scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(max_workers=max_workers),
                # the liveness beat has a thread of its own: busy sync workers are not a hang
                "liveness": ThreadPoolExecutor(max_workers=1),
                # so has the replica heartbeat: in the sync pool it would wait behind a
                # backlog of syncs (a large fleet's first loads) for longer than the lease
                # lasts; retention, which may take minutes, neither holds a sync worker nor
                # delays the heartbeat
                "replica": ThreadPoolExecutor(max_workers=1),
                "maintenance": ThreadPoolExecutor(max_workers=1),
            },
            timezone="UTC",
        )
        self._stop = threading.Event()
        #: held while sync jobs are added or removed; ``_closing`` is set under it before
        #: the scheduler shuts down. APScheduler's ``shutdown`` holds its job-store lock
        #: while it waits for the running jobs, so a job that adds or removes one then (a
        #: heartbeat scheduling what it just claimed) would wait for that lock, and the
        #: shutdown for the job, for ever
        self._jobs_lock = threading.Lock()
        self._closing = False
        self._signals = 0
        self.ticks = 0
        self._ticks_lock = threading.Lock()
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(syncer)
            metrics.attach_leases(self.leases)
            metrics.set_instances(len(self.instances))
        self.retention = retention
        self.liveness_seconds = liveness_seconds
        #: time.monotonic() of the last liveness beat (a cheap scheduler job)
        self.beat_at: float | None = None

    def _job(self, instance: Instance) -> SyncOutcome | None:
        iid = instance.id_instance
        claim: Claim | None = None
        if self.leases.enabled:
            claim = self.leases.claim(iid)
            if claim is None:
                self._not_held(instance)
                return None
        if not self.syncer.due(instance):
            log.debug("instance %s: backing off, tick skipped", iid)
            return None
        try:
            outcome = self.syncer.sync(instance, claim)
        except Exception:  # never let one tick kill the job or the daemon
            log.exception("instance %s: unexpected error in sync", iid)
            return None
        lost = outcome.error_kind == ErrorKind.LEASE_LOST
        if lost and claim is not None and self.leases.lost(iid, claim.epoch):
            self._unschedule([iid])
        with self._ticks_lock:
            self.ticks += 1
        return outcome

    def _not_held(self, instance: Instance) -> None:
        """A tick of an instance whose lease this replica cannot vouch for now."""
        iid = instance.id_instance
        reason = self.leases.unreachable
        if iid in self.leases.owned and reason is not None:
            # ours until now: the tick is lost to the outage and goes into sync_runs
            # (written once the database answers); it does not call the API
            lost = self.syncer.unreachable_outcome(instance, f"could not renew the lease: {reason}")
            self.syncer.defer_failure(lost, reason)
        else:
            # handed over, or this replica stalled and has not heard back yet: its next
            # heartbeat says which instances it still owns
            log.debug("instance %s: lease not confirmed; tick skipped", iid)

    def start(self, *, now: datetime | None = None) -> None:
        now = now or utcnow()
        try:
            self.leases.start()
        except SQLAlchemyError as exc:  # the database may be down right now; start anyway
            log.warning("could not prepare the instances' state rows: %s", type(exc).__name__)
        if self.leases.enabled:
            self._heartbeat(now)  # the first claims, scheduled before the scheduler starts
            self.scheduler.add_job(
                self._heartbeat,
                IntervalTrigger(seconds=self.leases.heartbeat_seconds, timezone="UTC"),
                id="replica-heartbeat",
                executor="replica",
                max_instances=1,
                coalesce=True,
            )
        else:
            self._own_all(now)
        self.scheduler.add_job(
            self._beat,
            IntervalTrigger(seconds=self.liveness_seconds, timezone="UTC"),
            id="liveness",
            executor="liveness",
            max_instances=1,
            coalesce=True,
        )
        if self.retention is not None and self.retention.sync_runs_days > 0:
            every = self.retention.interval_seconds
            self.scheduler.add_job(
                self._prune,
                IntervalTrigger(
                    seconds=every,
                    start_date=now + timedelta(seconds=min(every, 60)),
                    timezone="UTC",
                ),
                id="retention",
                executor="maintenance",
                max_instances=1,
                coalesce=True,
            )
        self.scheduler.start()
        self._beat()
        log.info("scheduler started: %d instances", len(self.instances))

    # -- which instances are scheduled ---------------------------------------------------

    def _own_all(self, now: datetime) -> None:
        """No leases (one process): every instance, from where its state row says it is
        due, its backoff resumed."""
        held = [Held(i.id_instance, 0, None) for i in self.instances]
        try:
            health = self.syncer.restore_backoff(self.instances)
            held = [
                Held(i.id_instance, 0, *health.get(i.id_instance, (None, 0)))
                for i in self.instances
            ]
        except SQLAlchemyError as exc:  # the database may be down right now; start anyway
            log.warning("could not read past failures to resume backoff: %s", type(exc).__name__)
        self.syncer.preload_ahead(self.instances)
        self._schedule(held, now, spread=None)

    def _schedule(self, held: Sequence[Held], now: datetime, *, spread: float | None) -> None:
        """A job per instance, first run when it is due. So that a fleet does not fire at
        once, the ones never synced are spread evenly over their interval, and the ones due
        already over ``spread`` seconds (None: their interval too)."""
        ours = [h for h in held if h.instance_id in self.by_id]
        new = [self.by_id[h.instance_id] for h in ours if h.next_due_at is None]
        late = [self.by_id[h.instance_id] for h in ours if _late(h, now) and h.next_due_at]
        offsets = stagger_offsets(new) | stagger_offsets(late, spread)
        with self._jobs_lock:
            if self._closing:  # stopping: what was claimed is released with the rest
                return
            for h in held:
                self._add_sync_job(h, now, offsets)

    def _add_sync_job(self, h: Held, now: datetime, offsets: dict[int, float]) -> None:
        inst = self.by_id.get(h.instance_id)
        if inst is None:
            return
        interval = timedelta(seconds=inst.interval_seconds)
        if h.instance_id in offsets:
            first = now + timedelta(seconds=0.2 + offsets[h.instance_id])
        elif h.failures:  # backing off: as late as the backoff says
            assert h.next_due_at is not None
            first = h.next_due_at
        else:  # due one interval after its last tick, by the interval configured now
            assert h.next_due_at is not None
            first = min(h.next_due_at, now + interval)
        self.scheduler.add_job(
            self._job,
            IntervalTrigger(seconds=inst.interval_seconds, start_date=first, timezone="UTC"),
            args=[inst],
            id=f"sync-{inst.id_instance}",
            name=f"getChats {inst.id_instance}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=inst.interval_seconds,
            replace_existing=True,
        )

    def _unschedule(self, instance_ids: Sequence[int], *, deadline: float | None = None) -> None:
        """Stop scheduling instances this replica no longer owns, and forget them; with a
        ``deadline``, first leave their snapshots for their next owner (a hand-back)."""
        with self._jobs_lock:
            if not self._closing:  # stopping: the scheduler goes with all its jobs
                for iid in instance_ids:
                    with contextlib.suppress(JobLookupError):
                        self.scheduler.remove_job(f"sync-{iid}")
        if deadline is not None:
            self._leave_snapshots(instance_ids, deadline)
        for iid in instance_ids:
            self.syncer.release(iid)

    def _leave_snapshots(self, instance_ids: Sequence[int] | None, deadline: float) -> None:
        """Write the snapshots of instances this daemon lets go (None: all it keeps) that
        the table does not hold, so that their next first tick, here after a restart or on
        the replica that claims them, costs a steady one (``Syncer.persist_held``)."""
        if not self.persist_on_release:
            return
        try:
            n = self.syncer.persist_held(instance_ids, deadline=deadline)
        except SQLAlchemyError as exc:
            log.warning("could not write the snapshots of instances let go: %s", type(exc).__name__)
            return
        if n:
            log.info("wrote %d snapshots for whoever syncs those instances next", n)

    def _heartbeat(self, now: datetime | None = None) -> None:
        """Renew the lease; schedule what was claimed, drop what was lost, hand back what
        is above the fair share."""
        started = time.monotonic()
        try:
            beat = self.leases.beat()
        except SQLAlchemyError as exc:
            log.warning("replica heartbeat failed: %s", type(exc).__name__)
            return
        took = time.monotonic() - started
        if took > self.leases.heartbeat_seconds:
            log.warning(
                "replica heartbeat took %.1f s (its interval is %.1f s)",
                took,
                self.leases.heartbeat_seconds,
            )
        if beat.lost:
            self._unschedule(beat.lost)
        if beat.gained:
            now = now or utcnow()
            gained = [self.by_id[h.instance_id] for h in beat.gained if h.instance_id in self.by_id]
            for h in beat.gained:
                inst = self.by_id.get(h.instance_id)
                if inst is not None:
                    self.syncer.adopt(inst, h.failures, h.failure_kind, h.next_due_at, now)
            # their snapshots, read ahead of their first ticks here (instances taken over
            # sync at the cost of a steady tick)
            self.syncer.preload_ahead(gained)
            self._schedule(beat.gained, now, spread=self.leases.heartbeat_seconds)
        if beat.excess:
            self._hand_back(beat.excess)

    def _hand_back(self, n: int) -> None:
        """Release ``n`` instances to the other replicas: the ones not syncing now whose
        next tick is furthest away (they were just synced)."""
        candidates = []
        with self._jobs_lock:
            if self._closing:  # stopping: every instance is released anyway
                return
            for iid in self.leases.owned:
                job = self.scheduler.get_job(f"sync-{iid}")
                if job is not None and not self.syncer.syncing(iid):
                    candidates.append((job.next_run_time, iid))
        chosen = [iid for _, iid in sorted(candidates, reverse=True)[:n]]
        if not chosen:
            return
        # one heartbeat at most for the snapshots: the lease is renewed by the next one
        self._unschedule(chosen, deadline=time.monotonic() + self.leases.heartbeat_seconds)
        try:
            self.leases.release(chosen)
        except SQLAlchemyError as exc:
            # still ours in the database: its lease renews them, and a replica whose lease
            # passed adopts them back when it reconciles
            log.warning("could not hand instances back: %s", type(exc).__name__)

    def _beat(self) -> None:
        self.beat_at = time.monotonic()

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason) for ``/healthz``: the scheduler runs and its jobs fire."""
        if self._stop.is_set():
            return False, "stopping"
        if not self.scheduler.running or self.beat_at is None:
            return False, "scheduler not running"
        age = time.monotonic() - self.beat_at
        if age > 3 * self.liveness_seconds + 5:
            return False, f"scheduler stalled: last heartbeat {age:.0f}s ago"
        return True, f"alive: {self.ticks} syncs so far, heartbeat {age:.1f}s ago"

    def _prune(self) -> None:
        assert self.retention is not None
        try:
            prune_sync_runs(
                self.syncer.engine,
                older_than_days=self.retention.sync_runs_days,
                batch_size=self.retention.batch_size,
                should_stop=self._stop.is_set,
                pause_seconds=0.05,
            )
        except SQLAlchemyError as exc:
            log.warning("retention: pruning sync_runs failed: %s", type(exc).__name__)
        except Exception:  # never let it kill the job
            log.exception("retention: unexpected error")

    def stop(self) -> bool:
        """Stop taking work; wait (bounded) for running syncs. True if they all finished."""
        self._stop.set()
        deadline = time.monotonic() + self.shutdown_timeout
        with self._jobs_lock:  # a job changing the schedule finishes that first
            self._closing = True
        if not self.scheduler.running:
            return True
        self.scheduler.pause()
        self.syncer.client.interrupt()
        done = threading.Event()

        def _shutdown() -> None:
            self.scheduler.shutdown(wait=True)
            done.set()

        threading.Thread(target=_shutdown, name="scheduler-shutdown", daemon=True).start()
        finished = done.wait(self.shutdown_timeout)
        if finished:
            # before the leases go: a replica claims an instance only once it is released
            self._leave_snapshots(None, deadline)
            try:
                self.leases.release_all()
            except SQLAlchemyError as exc:
                log.warning("could not release leases: %s", type(exc).__name__)
            log.info("scheduler stopped; running syncs finished")
        else:
            log.error("running syncs did not finish within %.0fs", self.shutdown_timeout)
        return finished

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second signal %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info(
            "signal %s: finishing running syncs (up to %.0fs), send again to exit now",
            signal.Signals(signum).name,
            self.shutdown_timeout,
        )
        self._stop.set()

    def run_forever(self) -> bool:
        """Start, block until SIGTERM/SIGINT, then shut down gracefully."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        while not self._stop.wait(1.0):
            pass
        return self.stop()

    def run_for(self, seconds: float) -> bool:
        """Run for a fixed time (the demo), then shut down gracefully."""
        self.start()
        self._stop.wait(seconds)
        return self.stop()

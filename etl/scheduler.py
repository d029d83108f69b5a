"""APScheduler wiring: one interval job per instance, staggered start, graceful shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import SQLAlchemyError

from etl.clock import utcnow
from etl.config import Instance, RetentionSettings
from etl.leases import LeaseManager
from etl.metrics import Metrics
from etl.retention import prune_sync_runs
from etl.sync import Syncer, SyncOutcome

log = logging.getLogger(__name__)


def stagger_offsets(instances: Sequence[Instance]) -> dict[int, float]:
    """Spread first runs evenly over each interval so a fleet does not fire at once."""
    by_interval: dict[int, list[Instance]] = {}
    for inst in instances:
        by_interval.setdefault(inst.interval_seconds, []).append(inst)
    offsets: dict[int, float] = {}
    for interval, group in by_interval.items():
        for i, inst in enumerate(group):
            offsets[inst.id_instance] = interval * i / len(group)
    return offsets


class Daemon:
    """Runs every enabled instance on its interval until ``stop()`` or a signal."""

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
    ) -> None:
        self.syncer = syncer
        self.instances = [i for i in instances if i.enabled]
        self.leases = leases if leases is not None else LeaseManager(syncer.engine, self.instances)
        self.shutdown_timeout = shutdown_timeout
        self.scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(max_workers=max_workers),
                # the liveness beat has a thread of its own: busy sync workers are not a hang
                "liveness": ThreadPoolExecutor(max_workers=1),
                # so has the replica heartbeat: in the sync pool it would wait behind a
                # backlog of syncs (a large fleet's first loads) for longer than the other
                # replicas count it alive; retention, which may take minutes, neither holds
                # a sync worker nor delays the heartbeat
                "replica": ThreadPoolExecutor(max_workers=1),
                "maintenance": ThreadPoolExecutor(max_workers=1),
            },
            timezone="UTC",
        )
        self._stop = threading.Event()
        self._signals = 0
        self.ticks = 0
        self._ticks_lock = threading.Lock()
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(syncer)
            metrics.set_instances(len(self.instances))
        self.retention = retention
        self.liveness_seconds = liveness_seconds
        #: time.monotonic() of the last liveness beat (a cheap scheduler job)
        self.beat_at: float | None = None

    def _job(self, instance: Instance) -> SyncOutcome | None:
        if not self.syncer.due(instance):
            log.debug("instance %s: backing off, tick skipped", instance.id_instance)
            return None
        try:
            if not self.leases.claim(instance):
                log.debug("instance %s: synced by another replica", instance.id_instance)
                return None
        except SQLAlchemyError as exc:
            reason = type(exc).__name__
            if instance.id_instance in self.leases.owned:
                # ours until now: the tick is lost to the outage and goes into sync_runs
                # (written once the database answers); another replica's is not ours to count
                lost = self.syncer.unreachable_outcome(
                    instance, f"could not claim the lease: {reason}"
                )
                self.syncer.defer_failure(lost, reason)
            else:
                log.warning(
                    "instance %s: could not claim the lease (%s); tick skipped",
                    instance.id_instance,
                    reason,
                )
            return None
        try:
            outcome = self.syncer.sync(instance)
        except Exception:  # never let one tick kill the job or the daemon
            log.exception("instance %s: unexpected error in sync", instance.id_instance)
            return None
        with self._ticks_lock:
            self.ticks += 1
        return outcome

    def start(self, *, now: datetime | None = None) -> None:
        now = now or utcnow()
        try:
            self.syncer.restore_backoff(self.instances)
        except SQLAlchemyError as exc:  # the database may be down right now; start anyway
            log.warning("could not read past failures to resume backoff: %s", type(exc).__name__)
        offsets = stagger_offsets(self.instances)
        for inst in self.instances:
            self.scheduler.add_job(
                self._job,
                IntervalTrigger(
                    seconds=inst.interval_seconds,
                    start_date=now + timedelta(seconds=0.2 + offsets[inst.id_instance]),
                    timezone="UTC",
                ),
                args=[inst],
                id=f"sync-{inst.id_instance}",
                name=f"getChats {inst.id_instance}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=inst.interval_seconds,
            )
        if self.leases.enabled:
            self._heartbeat()
            self.scheduler.add_job(
                self._heartbeat,
                IntervalTrigger(seconds=self.leases.heartbeat_seconds, timezone="UTC"),
                id="replica-heartbeat",
                executor="replica",
                max_instances=1,
                coalesce=True,
            )
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

    def _heartbeat(self) -> None:
        try:
            self.leases.heartbeat()
        except SQLAlchemyError as exc:
            log.warning("replica heartbeat failed: %s", type(exc).__name__)

    def stop(self) -> bool:
        """Stop taking work; wait (bounded) for running syncs. True if they all finished."""
        self._stop.set()
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

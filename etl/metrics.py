"""Prometheus metrics, fed by ``Syncer.listeners``; served at ``/metrics`` by ``etl.web``.

Every ``Metrics`` has its own ``CollectorRegistry`` (never the global one), so several can
live in one process (tests, a daemon and a one-off pass). The per-instance gauges carry an
``id_instance`` label (not ``instance``: Prometheus sets that label on every scraped
target itself); with ``per_instance=False`` they become one fleet-wide sample each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from etl.config import Instance
from etl.leases import LeaseManager
from etl.status import InstanceStatus
from etl.sync import Syncer, SyncOutcome

#: seconds; a sync is bounded to 80% of its interval (48 s at the default 60 s)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
SUCCESS = frozenset({"ok", "anomaly"})  # the API answered with a usable list


class _InstanceGauges(Collector):
    """Last success time and consecutive failures, per instance or fleet-wide."""

    def __init__(self, per_instance: bool) -> None:
        self.per_instance = per_instance
        self.last_success: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            last_success = dict(self.last_success)
            failures = dict(self.failures)
        labels = ["id_instance"] if self.per_instance else []
        success = GaugeMetricFamily(
            "chatsync_last_success_timestamp_seconds",
            "Unix time of the last sync that got a usable list (ok or anomaly)"
            + ("" if self.per_instance else "; the oldest across instances"),
            labels=labels,
        )
        failing = GaugeMetricFamily(
            "chatsync_consecutive_failures",
            "Failed syncs in a row" + ("" if self.per_instance else "; the most of any instance"),
            labels=labels,
        )
        if self.per_instance:
            for iid, ts in sorted(last_success.items()):
                success.add_metric([str(iid)], ts)
            for iid, n in sorted(failures.items()):
                failing.add_metric([str(iid)], n)
        else:
            if last_success:
                success.add_metric([], min(last_success.values()))
            failing.add_metric([], max(failures.values(), default=0))
        count = GaugeMetricFamily(
            "chatsync_instances_failing", "Instances whose latest sync failed"
        )
        count.add_metric([], sum(1 for n in failures.values() if n > 0))
        yield from (success, failing, count)


class _LeaseGauges(Collector):
    """Several replicas: what this replica owns, and what coordinating cost it."""

    def __init__(self, leases: LeaseManager) -> None:
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        owned = GaugeMetricFamily(
            "chatsync_instances_owned", "Instances this replica owns (leases on PostgreSQL)"
        )
        owned.add_metric([], len(self.leases.owned))
        statements = CounterMetricFamily(
            "chatsync_lease_statements",
            "Statements sent to coordinate with other replicas, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.leases.statements.items()):
            statements.add_metric([kind], n)
        yield from (owned, statements)


class Metrics:
    """The daemon's metrics; ``observe`` is the ``Syncer`` listener."""

    def __init__(self, *, per_instance: bool = True) -> None:
        # no `*_created` series: they double the series count and nobody graphs them
        # (process-wide, like the environment variable PROMETHEUS_DISABLE_CREATED_SERIES)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.syncs = Counter(
            "chatsync_syncs", "Syncs by outcome", ["status", "error_kind"], registry=r
        )
        self.duration = Histogram(
            "chatsync_sync_duration_seconds",
            "Sync duration (fetch and write) by outcome",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.http_attempts = Counter(
            "chatsync_http_attempts", "HTTP attempts made to Green-API", registry=r
        )
        self.chats_written = Counter(
            "chatsync_chats_written", "Chats written, by kind of change", ["kind"], registry=r
        )
        self.ephemeral_changes = Counter(
            "chatsync_ephemeral_changes",
            "Disappearing-message setting changes of known chats",
            registry=r,
        )
        self.instances = Gauge("chatsync_instances", "Instances configured and enabled", registry=r)
        self._gauges = _InstanceGauges(per_instance)
        r.register(self._gauges)
        self._syncer: Syncer | None = None
        for kind in ("inserted", "updated", "removed"):
            self.chats_written.labels(kind=kind)  # present at 0 from the start

    def attach(self, syncer: Syncer) -> None:
        """Observe every sync of ``syncer`` (consecutive failures come from it too)."""
        self._syncer = syncer
        syncer.listeners.append(self.observe)

    def attach_leases(self, leases: LeaseManager) -> None:
        """Report what the replica owns and its coordination statements."""
        if leases.enabled:
            self.registry.register(_LeaseGauges(leases))

    def observe(self, instance: Instance, outcome: SyncOutcome) -> None:
        """The listener: count one finished sync."""
        self.syncs.labels(status=outcome.status, error_kind=outcome.error_kind or "").inc()
        if outcome.status == "skipped":  # overlapping tick: no fetch, no row
            return
        self.duration.labels(status=outcome.status).observe(outcome.duration_ms / 1000)
        self.http_attempts.inc(outcome.attempts)
        self.chats_written.labels(kind="inserted").inc(outcome.chats_inserted)
        self.chats_written.labels(kind="updated").inc(outcome.chats_updated)
        self.chats_written.labels(kind="removed").inc(outcome.chats_removed)
        self.ephemeral_changes.inc(outcome.ephemeral_changes)
        iid = instance.id_instance
        g = self._gauges
        with g.lock:
            if outcome.status in SUCCESS:
                g.last_success[iid] = (outcome.finished_at or outcome.started_at).timestamp()
                g.failures[iid] = 0
            elif self._syncer is not None:
                g.failures[iid] = self._syncer.consecutive_failures(iid)
            else:
                g.failures[iid] = g.failures.get(iid, 0) + 1

    def seed(self, statuses: Iterable[InstanceStatus]) -> None:
        """Start from what the database knows (after a restart) instead of from nothing."""
        g = self._gauges
        with g.lock:
            for s in statuses:
                if not s.enabled:
                    continue
                if s.last_success_at is not None:
                    g.last_success.setdefault(s.instance_id, s.last_success_at.timestamp())
                g.failures.setdefault(s.instance_id, s.consecutive_failures)

    def set_instances(self, n: int) -> None:
        self.instances.set(n)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

"""Prometheus metrics: real syncs against the simulator on both backends, scraped over HTTP
from the status server and parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from etl.client import GreenApiClient
from etl.metrics import Metrics
from etl.simulator import Fault, Simulator
from etl.status import InstanceStatus
from etl.sync import Syncer, SyncOutcome, register_instances
from etl.web import StatusServer
from tests.conftest import make_instance

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """{(sample name, labels): value} for every sample in the exposition text."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(server: StatusServer) -> Samples:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(resp.read().decode())


def test_metrics_after_real_syncs(
    engine: Engine, sim: Simulator, fast_client: GreenApiClient
) -> None:
    fleet = [make_instance(sim, iid) for iid in sim.instance_ids]
    register_instances(engine, fleet)
    good, bad = fleet[:2], fleet[2]
    sim.set_fault(bad.id_instance, Fault(status=401))
    syncer = Syncer(engine, fast_client)
    metrics = Metrics()
    metrics.attach(syncer)
    metrics.set_instances(len(fleet))
    outcomes = [syncer.sync(inst) for _ in range(2) for inst in fleet]

    with StatusServer(engine, metrics=metrics, port=0) as server:
        samples = scrape(server)

    assert value(samples, "chatsync_instances") == 3
    assert value(samples, "chatsync_syncs_total", status="ok", error_kind="") == 4
    assert value(samples, "chatsync_syncs_total", status="failed", error_kind="unauthorized") == 2
    assert value(samples, "chatsync_sync_duration_seconds_count", status="ok") == 4
    assert value(samples, "chatsync_sync_duration_seconds_count", status="failed") == 2
    assert value(samples, "chatsync_sync_duration_seconds_sum", status="ok") == pytest.approx(
        sum(o.duration_ms for o in outcomes if o.status == "ok") / 1000
    )
    assert value(samples, "chatsync_http_attempts_total") == sum(o.attempts for o in outcomes)
    inserted = sum(len(sim.chats(i.id_instance)) for i in good)
    assert value(samples, "chatsync_chats_written_total", kind="inserted") == inserted
    assert value(samples, "chatsync_chats_written_total", kind="updated") == 0
    assert value(samples, "chatsync_chats_written_total", kind="removed") == 0
    assert value(samples, "chatsync_ephemeral_changes_total") == 0

    for inst in good:
        mine = [o for o in outcomes if o.instance_id == inst.id_instance]
        last = max(o.finished_at or o.started_at for o in mine)
        stamp = value(
            samples, "chatsync_last_success_timestamp_seconds", id_instance=str(inst.id_instance)
        )
        assert stamp == pytest.approx(last.timestamp())
        assert (
            value(samples, "chatsync_consecutive_failures", id_instance=str(inst.id_instance)) == 0
        )
    bad_id = str(bad.id_instance)
    assert value(samples, "chatsync_consecutive_failures", id_instance=bad_id) == 2
    never = ("chatsync_last_success_timestamp_seconds", frozenset({("id_instance", bad_id)}))
    assert never not in samples
    assert value(samples, "chatsync_instances_failing") == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def _outcome(iid: int, status: str, at: datetime) -> SyncOutcome:
    return SyncOutcome(
        iid,
        status,
        at,
        finished_at=at,
        error_kind=None if status == "ok" else "timeout",
        attempts=1,
        duration_ms=250,
    )


def test_per_instance_labels_can_be_switched_off(sim: Simulator) -> None:
    a, b, c = (make_instance(sim, iid) for iid in sim.instance_ids)
    t0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    for per_instance in (True, False):
        metrics = Metrics(per_instance=per_instance)
        metrics.observe(a, _outcome(a.id_instance, "ok", t0))
        metrics.observe(b, _outcome(b.id_instance, "ok", t0 + timedelta(minutes=5)))
        for _ in range(3):
            metrics.observe(c, _outcome(c.id_instance, "failed", t0))
        samples = parse(metrics.render().decode())
        labelled = [s for s in samples if ("id_instance", str(a.id_instance)) in s[1]]
        if per_instance:
            assert len(labelled) == 2  # last success and consecutive failures
            assert value(samples, "chatsync_consecutive_failures", id_instance=str(c.id_instance))
            continue
        assert labelled == []
        assert not any(dict(labels).get("id_instance") for _, labels in samples)
        # fleet-wide: the oldest last success, the longest failure streak
        assert value(samples, "chatsync_last_success_timestamp_seconds") == t0.timestamp()
        assert value(samples, "chatsync_consecutive_failures") == 3
        assert value(samples, "chatsync_instances_failing") == 1
        assert value(samples, "chatsync_syncs_total", status="failed", error_kind="timeout") == 3


def test_metrics_registries_are_independent_and_seeded_from_the_database() -> None:
    first, second = Metrics(), Metrics()
    first.set_instances(5)
    assert value(parse(second.render().decode()), "chatsync_instances") == 0
    at = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    second.seed(
        [
            InstanceStatus(7, "seven", True, at, "failed", "timeout", "x", 10, at, 4, 0),
            InstanceStatus(8, "eight", False, at, "ok", None, None, 10, at, 0, 0),  # disabled
        ]
    )
    samples = parse(second.render().decode())
    assert value(samples, "chatsync_consecutive_failures", id_instance="7") == 4
    assert value(samples, "chatsync_last_success_timestamp_seconds", id_instance="7") == (
        at.timestamp()
    )
    assert ("chatsync_consecutive_failures", frozenset({("id_instance", "8")})) not in samples

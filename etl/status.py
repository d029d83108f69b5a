"""Read-only status facts for the status page, ``/status.json`` and ``etl status``.

Both queries stay cheap on a large fleet: the per-instance facts come from the
``instance_sync_health`` view plus one index lookup of each instance's latest run
(``ix_sync_runs_instance_started``); the chart aggregates the last 24 hours of runs into
time buckets in the database (range scan of ``ix_sync_runs_started_at``), and
``RecentRuns`` remembers the buckets that can no longer change, so a refreshing page only
reads the last few minutes. The present-chats count is a full pass over ``chats``: callers
that refresh often cache it (the web server keeps it for a minute).
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Boolean, Connection, Engine, Integer, Text, bindparam, text

from etl.clock import utcnow
from etl.db import read_only
from etl.errors import ERROR_KINDS, error_kind
from etl.models import SYNC_STATUSES, UTCDateTime
from etl.redact import redact


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """One instance as the status page shows it."""

    instance_id: int
    label: str
    enabled: bool
    last_run_at: datetime | None
    last_status: str | None
    last_error_kind: str | None
    last_error: str | None  # the latest run's error (redacted); None when it had none
    last_duration_ms: int | None
    last_success_at: datetime | None
    consecutive_failures: int
    chats: int  # present (not removed)
    #: getStateInstance's answer, when the latest run asked it
    last_instance_state: str | None = None
    #: what the operator should do about the latest run (``KindInfo.action``), if anything
    last_action: str | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("last_run_at", "last_success_at"):
            value = out[key]
            out[key] = value.isoformat() if value is not None else None
        return out


@dataclass(frozen=True, slots=True)
class Bucket:
    """Sync runs started in ``[start, start + width)``: count per status, durations."""

    start: datetime
    counts: dict[str, int]
    avg_ms: float | None
    max_ms: int | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_INSTANCES = text(
    """
SELECT i.id_instance, i.label, i.enabled,
       h.last_success_at, h.consecutive_failures,
       r.started_at AS last_run_at, r.status AS last_status, r.error_kind, r.error,
       r.duration_ms, r.instance_state
FROM instances i
JOIN instance_sync_health h ON h.instance_id = i.id_instance
LEFT JOIN sync_runs r ON r.id = (
    SELECT r2.id FROM sync_runs r2 WHERE r2.instance_id = i.id_instance
    ORDER BY r2.started_at DESC, r2.id DESC LIMIT 1)
ORDER BY i.id_instance
"""
).columns(
    id_instance=Integer,
    label=Text,
    enabled=Boolean,
    last_success_at=UTCDateTime(),
    consecutive_failures=Integer,
    last_run_at=UTCDateTime(),
    last_status=Text,
    error_kind=Text,
    error=Text,
    duration_ms=Integer,
    instance_state=Text,
)

_CHATS = text(
    "SELECT instance_id, COUNT(*) FROM chats WHERE removed_at IS NULL GROUP BY instance_id"
)


def _no_jit(conn: Connection) -> None:
    # PostgreSQL's JIT costs more than these index-driven queries take on a big fleet
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL jit = off"))


def chat_counts(engine: Engine) -> dict[int, int]:
    """Present (not removed) chats per instance."""
    with read_only(engine) as conn:
        _no_jit(conn)
        return {int(iid): int(n) for iid, n in conn.execute(_CHATS)}


def instance_status(engine: Engine, *, chats: dict[int, int] | None = None) -> list[InstanceStatus]:
    """Every registered instance with its latest run, last success and present chats
    (``chats``: counts from ``chat_counts()``, read now when not given)."""
    if chats is None:
        chats = chat_counts(engine)
    with read_only(engine) as conn:
        _no_jit(conn)
        rows = conn.execute(_INSTANCES).all()
    return [
        InstanceStatus(
            instance_id=r.id_instance,
            label=r.label or "",
            enabled=bool(r.enabled),
            last_run_at=r.last_run_at,
            last_status=r.last_status,
            last_error_kind=r.error_kind,
            last_error=redact(r.error) if r.error else None,
            last_duration_ms=r.duration_ms,
            last_success_at=r.last_success_at,
            consecutive_failures=int(r.consecutive_failures or 0),
            chats=chats.get(r.id_instance, 0),
            last_instance_state=r.instance_state,
            last_action=action(r.last_status, r.error_kind),
        )
        for r in rows
    ]


def action(status: str | None, kind: str | None) -> str | None:
    """What the operator should do about a failed or held run (``ERROR_KINDS``)."""
    known = error_kind(kind)
    if status not in ("failed", "anomaly") or known is None:
        return None
    return ERROR_KINDS[known].action


def state(s: InstanceStatus) -> str:
    """The latest run's status, ``never`` before the first run, ``disabled`` when disabled."""
    if not s.enabled:
        return "disabled"
    return s.last_status or "never"


def summary(statuses: list[InstanceStatus]) -> dict[str, int]:
    """How many instances are in each ``state()``, and in all."""
    out = {"instances": len(statuses), **dict.fromkeys(SYNC_STATUSES, 0)}
    out |= {"never": 0, "disabled": 0}
    for s in statuses:
        out[state(s)] = out.get(state(s), 0) + 1
    return out


def status_document(engine: Engine, *, now: datetime | None = None) -> dict[str, Any]:
    """``/status.json`` and ``etl status --json``."""
    statuses = instance_status(engine)
    return {
        "generated_at": (now or utcnow()).isoformat(),
        "summary": summary(statuses),
        "instances": [s.as_json() for s in statuses],
    }


def ago(then: datetime | None, now: datetime) -> str:
    """ "42 s ago", "5 min ago", "3 h ago", "2 d ago" or "never"."""
    if then is None:
        return "never"
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172_800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def stamp(t: datetime | None) -> str:
    """ "2026-11-26 12:00:05 UTC", or "" for None."""
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else ""


def format_ms(ms: float | None) -> str:
    """ "850 ms", "12.5 s", or "–" for None."""
    if ms is None:
        return "–"
    return f"{ms:,.0f} ms" if ms < 10_000 else f"{ms / 1000:,.1f} s"


#: runs per (time bucket, status); the bucket number is >= 0 thanks to the WHERE clause
_RECENT = {
    "postgresql": """
SELECT b, status, COUNT(*) AS n, SUM(duration_ms) AS total_ms, MAX(duration_ms) AS max_ms
FROM (SELECT CAST(FLOOR((EXTRACT(EPOCH FROM started_at) - :start_epoch) / :width) AS INTEGER)
             AS b, status, duration_ms
      FROM sync_runs WHERE started_at >= :start AND started_at < :end) runs
GROUP BY b, status
""",
    # stored as UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'; 2440587.5 is the Julian day of
    # 1970-01-01; CAST truncates, which is FLOOR for these non-negative values
    "sqlite": """
SELECT b, status, COUNT(*) AS n, SUM(duration_ms) AS total_ms, MAX(duration_ms) AS max_ms
FROM (SELECT CAST(((julianday(started_at) - 2440587.5) * 86400.0 - :start_epoch) / :width
                  AS INTEGER) AS b, status, duration_ms
      FROM sync_runs WHERE started_at >= :start AND started_at < :end) runs
GROUP BY b, status
""",
}


def _grid(hours: int, buckets: int, now: datetime) -> tuple[datetime, int]:
    """(start of the first bucket, bucket width in seconds), aligned to the width."""
    width = hours * 3600 // buckets
    end_epoch = math.floor(now.timestamp() / width) * width + width
    end = datetime.fromtimestamp(end_epoch, tz=now.tzinfo)
    return end - timedelta(seconds=width * buckets), width


def _aggregate(engine: Engine, start: datetime, width: int, n: int) -> list[Bucket]:
    """``n`` buckets of ``width`` seconds from ``start``, counted in the database."""
    query = text(_RECENT[engine.dialect.name]).bindparams(
        bindparam("start", type_=UTCDateTime()),
        bindparam("end", type_=UTCDateTime()),
    )
    counts = [dict.fromkeys(SYNC_STATUSES, 0) for _ in range(n)]
    total_ms = [0] * n
    max_ms: list[int | None] = [None] * n
    params = {
        "start": start,
        "end": start + timedelta(seconds=width * n),
        "start_epoch": start.timestamp(),
        "width": float(width),
    }
    with read_only(engine) as conn:
        _no_jit(conn)
        for b, status, count, tot, mx in conn.execute(query, params):
            i = min(max(int(b), 0), n - 1)  # float rounding at the edges
            counts[i][status] = counts[i].get(status, 0) + int(count)
            total_ms[i] += int(tot or 0)
            if mx is not None:
                max_ms[i] = max(int(mx), max_ms[i] or 0)
    out = []
    for i in range(n):
        total = sum(counts[i].values())
        out.append(
            Bucket(
                start=start + timedelta(seconds=width * i),
                counts=counts[i],
                avg_ms=total_ms[i] / total if total else None,
                max_ms=max_ms[i],
            )
        )
    return out


def recent_runs(
    engine: Engine, *, hours: int = 24, buckets: int = 48, now: datetime | None = None
) -> list[Bucket]:
    """The last ``hours`` of sync runs in ``buckets`` equal buckets, oldest first.

    Buckets are aligned to their width (the last one holds the current, partial slot).
    """
    start, width = _grid(hours, buckets, now or utcnow())
    return _aggregate(engine, start, width, buckets)


class RecentRuns:
    """``recent_runs()`` that remembers settled buckets (ended more than ``settle`` ago:
    a run row is written when its sync ends, with the time it started) and reads only
    the buckets after them. Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        *,
        hours: int = 24,
        buckets: int = 48,
        settle: timedelta = timedelta(minutes=5),
    ) -> None:
        self.engine = engine
        self.hours = hours
        self.buckets = buckets
        self.settle = settle
        self._settled: dict[datetime, Bucket] = {}
        self._lock = threading.Lock()

    def get(self, now: datetime | None = None) -> list[Bucket]:
        now = now or utcnow()
        start, width = _grid(self.hours, self.buckets, now)
        starts = [start + timedelta(seconds=width * i) for i in range(self.buckets)]
        with self._lock:
            known = {t: self._settled[t] for t in starts if t in self._settled}
            first = next((i for i, t in enumerate(starts) if t not in known), self.buckets)
            fresh = _aggregate(self.engine, starts[first], width, self.buckets - first)
            step = timedelta(seconds=width)
            self._settled = known | {
                b.start: b for b in fresh if b.start + step <= now - self.settle
            }
        return [known[t] for t in starts[:first]] + fresh

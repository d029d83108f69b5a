"""The operations endpoint: ``/metrics``, ``/healthz``, ``/readyz``, ``/`` and ``/status.json``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread, read-only, loopback by default. The
status page is plain HTML with an inline SVG chart drawn here, on the server: no
JavaScript, no external resource (the Content-Security-Policy forbids both). Every piece
of data on it (labels, error texts) is escaped, and error texts are redacted again. A
failing request answers 500 or 503 and is logged; it never reaches the daemon.
"""

from __future__ import annotations

import html
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import urlsplit

from alembic.runtime.migration import MigrationContext
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from etl import __version__
from etl.clock import utcnow
from etl.db import head_revision, read_only
from etl.errors import ERROR_KINDS, ErrorKind
from etl.metrics import Metrics
from etl.models import SYNC_STATUSES
from etl.redact import redact
from etl.status import (
    Bucket,
    InstanceStatus,
    RecentRuns,
    ago,
    chat_counts,
    format_ms,
    instance_status,
    stamp,
    state,
    summary,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

Liveness = Callable[[], tuple[bool, str]]
Reply = tuple[int, str, bytes]

HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
JSON_TYPE = "application/json"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
COLORS = {"ok": "#2f9e5f", "anomaly": "#e3a008", "failed": "#d64545", "line": "#2d5fc4"}
REFRESH_SECONDS = 60


def readiness(engine: Engine, head: str | None) -> tuple[bool, str]:
    """The database answers and is at the latest revision."""
    try:
        with read_only(engine) as conn:
            conn.execute(text("SELECT 1"))
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        return False, f"database unavailable: {type(exc).__name__}"
    if current != head:
        return False, f"database at revision {current or 'none'}, latest is {head}"
    return True, f"ready: database at revision {head}"


class _Cache:
    """Results of expensive reads, kept for a while; one computation per key at a time."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, Any]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str, seconds: float, compute: Callable[[], T]) -> T:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # a burst of requests runs the query once
            hit = self._values.get(key)
            if hit is not None and time.monotonic() - hit[0] < seconds:
                return hit[1]  # type: ignore[no-any-return]
            value = compute()
            self._values[key] = (time.monotonic(), value)
            return value


class StatusServer:
    """Serves the operations endpoints until ``stop()``; ``port=0`` picks a free port."""

    def __init__(
        self,
        engine: Engine,
        *,
        metrics: Metrics | None = None,
        liveness: Liveness = lambda: (True, "alive"),
        host: str = "127.0.0.1",
        port: int = 8000,
        cache_seconds: float = 10.0,
        max_rows: int = 2000,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.liveness = liveness
        self.host = host
        self.requested_port = port
        self.max_rows = max_rows
        self.head = head_revision()
        self.cache_seconds = cache_seconds
        self._cache = _Cache()
        self._chart = RecentRuns(engine)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StatusServer:
        """Bind (raises OSError when the port is taken) and serve in a daemon thread."""
        self._httpd = _Server((self.host, self.requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() waits
            name="status-http",
            daemon=True,
        )
        self._thread.start()
        log.info("status page and metrics on %s/", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- routes ------------------------------------------------------------------------

    def handle(self, path: str) -> Reply:
        route = {
            "/": self._page,
            "/status.json": self._json,
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }.get(path)
        if route is None:
            return 404, TEXT_TYPE, b"not found\n"
        try:
            return route()
        except SQLAlchemyError as exc:
            log.warning("%s: database unavailable: %s", path, type(exc).__name__)
            message = f"database unavailable: {type(exc).__name__}\n"
            return 503, TEXT_TYPE, message.encode()

    def _healthz(self) -> Reply:
        alive, reason = self.liveness()
        return (200 if alive else 503), TEXT_TYPE, f"{reason}\n".encode()

    def _readyz(self) -> Reply:
        ready, reason = readiness(self.engine, self.head)
        return (200 if ready else 503), TEXT_TYPE, f"{reason}\n".encode()

    def _metrics(self) -> Reply:
        if self.metrics is None:
            return 404, TEXT_TYPE, b"metrics are not enabled\n"
        return 200, CONTENT_TYPE_LATEST, self.metrics.render()

    def _statuses(self) -> list[InstanceStatus]:
        # chat counts read every chat row: refreshed less often than the rest
        chats = self._cache.get("chats", 6 * self.cache_seconds, self._chat_counts)
        return self._cache.get(
            "instances", self.cache_seconds, lambda: instance_status(self.engine, chats=chats)
        )

    def _chat_counts(self) -> dict[int, int]:
        return chat_counts(self.engine)

    def _json(self) -> Reply:
        statuses = self._statuses()
        doc = {
            "generated_at": utcnow().isoformat(),
            "summary": summary(statuses),
            "instances": [s.as_json() for s in statuses],
        }
        return 200, JSON_TYPE, json.dumps(doc, indent=1).encode()

    def _page(self) -> Reply:
        statuses = self._statuses()
        buckets = self._cache.get("chart", self.cache_seconds, self._chart.get)
        page = render_page(statuses, buckets, now=utcnow(), max_rows=self.max_rows)
        return 200, HTML_TYPE, page.encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: StatusServer) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("status-http: connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"chatsync/{__version__}"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status-http: " + format, *args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        try:
            status, ctype, body = self.server.app.handle(path)
        except Exception:  # a bug in a page must not take the endpoint (or daemon) down
            log.exception("status-http: %s failed", path)
            status, ctype, body = 500, TEXT_TYPE, b"internal error (see the daemon's log)\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


# -- the page ----------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_ORDER = {"failed": 0, "anomaly": 1, "never": 2, "ok": 3, "disabled": 4}


def _sort_key(s: InstanceStatus) -> tuple[int, int, str, int]:
    return (_ORDER.get(state(s), 3), -s.consecutive_failures, s.label.lower(), s.instance_id)


NICE_STEPS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8, 10)


def _axis_max(value: float, *, whole: bool = False, ticks: int = 4) -> float:
    """A round axis maximum at or above ``value`` whose ``ticks`` steps are round too."""
    raw = max(value, 1.0) / ticks
    magnitude: float = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in NICE_STEPS if m * magnitude >= raw)
    if whole:
        step = max(1, math.ceil(step))
    return step * ticks


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where the plot sits in the chart's SVG, and the scales of its two axes."""

    left: int  # left edge of the plot (room for the runs axis)
    top: int  # top edge of the plot (room for the axis titles and the legend)
    pw: int  # plot width
    ph: int  # plot height
    slot: float  # horizontal room per bucket
    bar: float  # width of a bucket's bar
    y_max: float  # runs at the top of the left axis
    d_max: float  # average duration (ms) at the top of the right axis

    @classmethod
    def fit(cls, buckets: list[Bucket], width: int, height: int) -> _Frame:
        left, right, top, bottom = 48, 72, 30, 34
        pw, ph = width - left - right, height - top - bottom
        slot = pw / max(1, len(buckets))
        durations = [b.avg_ms for b in buckets if b.avg_ms is not None]
        return cls(
            left=left,
            top=top,
            pw=pw,
            ph=ph,
            slot=slot,
            bar=max(1.0, slot * 0.72),
            y_max=_axis_max(max((b.total for b in buckets), default=0), whole=True),
            d_max=_axis_max(max(durations, default=0), whole=True),
        )


def render_chart(buckets: list[Bucket], *, width: int = 1100, height: int = 260) -> str:
    """Stacked bars of outcomes per bucket and a line of the average duration, as SVG."""
    f = _Frame.fit(buckets, width, height)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="Sync runs and average duration over the last 24 hours">',
        "<title>Sync runs per half hour and average sync duration, last 24 hours</title>",
        _chart_axes(f, width),
    ]
    seconds = (buckets[1].start - buckets[0].start).total_seconds() if buckets else 0.0
    points: list[str] = []
    for i, b in enumerate(buckets):
        out.append(_bucket_bars(f, i, b, _bucket_tip(b, seconds, alone=len(buckets) == 1)))
        if b.avg_ms is not None:
            cx = f.left + f.slot * i + f.slot / 2
            points.append(f"{cx:.1f},{f.top + f.ph - f.ph * b.avg_ms / f.d_max:.1f}")
        if i % 6 == 0:
            out.append(
                f'<text x="{f.left + f.slot * i:.1f}" y="{f.top + f.ph + 18}" class="axis">'
                f"{b.start:%H:%M}</text>"
            )
    if points:
        out.append(_duration_line(points))
    if not any(b.total for b in buckets):
        out.append(
            f'<text x="{f.left + f.pw / 2}" y="{f.top + f.ph / 2}" text-anchor="middle" '
            'class="empty">no sync runs in the last 24 hours</text>'
        )
    out.append(
        f'<line x1="{f.left}" y1="{f.top + f.ph}" x2="{f.left + f.pw}" y2="{f.top + f.ph}" '
        'class="baseline"/>'
    )
    out.append(_chart_legend(f.left))
    out.append("</svg>")
    return "".join(out)


def _chart_axes(f: _Frame, width: int) -> str:
    """Grid lines with the runs scale on the left, the duration scale on the right."""
    out = []
    for i in range(5):
        y = f.top + f.ph - f.ph * i / 4
        out.append(
            f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.left + f.pw}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{f.left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
            f"{round(f.y_max * i / 4):,}</text>"
            f'<text x="{f.left + f.pw + 6}" y="{y + 4:.1f}" class="axis dur">'
            f"{_e(format_ms(f.d_max * i / 4))}</text>"
        )
    out.append(
        f'<text x="{f.left - 6}" y="{f.top - 12}" class="axis" text-anchor="end">runs</text>'
        f'<text x="{width - 2}" y="{f.top - 12}" class="axis dur" text-anchor="end">'
        "avg duration</text>"
    )
    return "".join(out)


def _bucket_tip(b: Bucket, seconds: float, *, alone: bool) -> str:
    """The tooltip of one bucket (``seconds``: the width of a bucket)."""
    if alone:
        return f"{b.total} runs"
    parts = ", ".join(f"{b.counts.get(s, 0)} {s}" for s in SYNC_STATUSES)
    end = datetime.fromtimestamp(b.start.timestamp() + seconds, b.start.tzinfo)
    return (
        f"{b.start:%H:%M}–{end:%H:%M} UTC: "
        f"{b.total} runs ({parts}); avg {format_ms(b.avg_ms)}, max {format_ms(b.max_ms)}"
    )


def _bucket_bars(f: _Frame, i: int, b: Bucket, tip: str) -> str:
    """Bucket ``i``: its outcomes stacked bottom up, in a group that carries the tooltip."""
    x = f.left + f.slot * i + (f.slot - f.bar) / 2
    y: float = f.top + f.ph
    out = [f"<g><title>{_e(tip)}</title>"]
    if b.total == 0:  # an invisible hit area keeps the tooltip for empty slots
        out.append(
            f'<rect x="{x:.1f}" y="{f.top}" width="{f.bar:.1f}" height="{f.ph}" '
            'fill="transparent"/>'
        )
    for status in SYNC_STATUSES:
        count = b.counts.get(status, 0)
        if not count:
            continue
        h = f.ph * count / f.y_max
        y -= h
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{f.bar:.1f}" height="{h:.1f}" '
            f'fill="{COLORS[status]}" class="bar {status}"/>'
        )
    out.append("</g>")
    return "".join(out)


def _duration_line(points: list[str]) -> str:
    """The average duration: a line through the buckets that had runs, a dot on each."""
    out = [
        f'<polyline points="{" ".join(points)}" fill="none" stroke="{COLORS["line"]}" '
        'stroke-width="2" stroke-linejoin="round" class="duration"/>'
    ]
    for point in points:
        px, py = point.split(",")
        out.append(f'<circle cx="{px}" cy="{py}" r="2.5" fill="{COLORS["line"]}"/>')
    return "".join(out)


def _chart_legend(left: int) -> str:
    """One swatch per outcome, then the duration line's, along the top edge."""
    out = []
    x = left
    for name, color in [*((s, COLORS[s]) for s in SYNC_STATUSES), ("avg duration", "line")]:
        swatch = COLORS[color] if color == "line" else color
        shape = (
            f'<line x1="{x}" y1="10" x2="{x + 12}" y2="10" stroke="{swatch}" stroke-width="2"/>'
            if color == "line"
            else f'<rect x="{x}" y="4" width="12" height="12" fill="{swatch}"/>'
        )
        out.append(f'{shape}<text x="{x + 17}" y="14" class="legend">{_e(name)}</text>')
        x += 30 + 7 * len(name)
    return "".join(out)


STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0; color: #1d2430; background: #f4f6f9; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0; }
h2 { font-size: 15px; margin: 0 0 10px; color: #3b4657; text-transform: uppercase;
     letter-spacing: .04em; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 16px; }
.meta { color: #5b6678; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; padding: 10px 16px;
        min-width: 110px; }
.card b { display: block; font-size: 22px; }
.card span { color: #5b6678; }
.card.failed b { color: #d64545; } .card.anomaly b { color: #b07800; }
.card.ok b { color: #2f9e5f; }
section.panel { background: #fff; border: 1px solid #dde2ea; border-radius: 8px;
                padding: 14px 16px; margin-bottom: 16px; overflow-x: auto; }
svg.chart { display: block; width: 100%; height: auto; font-size: 11px; }
svg .grid { stroke: #e6e9ef; } svg .baseline { stroke: #9aa3b2; }
svg .axis { fill: #5b6678; } svg .dur { fill: #2d5fc4; } svg .legend { fill: #3b4657; }
svg .empty { fill: #8a94a6; font-size: 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #edf0f4;
         vertical-align: top; }
th { white-space: nowrap; font-size: 12px; color: #5b6678; font-weight: 600; background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td .id { display: block; color: #8a94a6; font-size: 12px; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
        font-weight: 600; color: #fff; background: #8a94a6; }
.pill.ok { background: #2f9e5f; } .pill.anomaly { background: #e3a008; }
.pill.failed { background: #d64545; }
td.error { color: #8b2d2d; max-width: 420px; word-break: break-word; }
td.error .kind { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
td.error .action, td.error .state { color: #555; font-size: 12px; margin-top: 2px; }
.muted { color: #8a94a6; }
footer { color: #5b6678; font-size: 12px; }
footer a { color: #2d5fc4; }
"""


MUTED_ZERO = '<span class="muted">0</span>'


def _kind(kind: str | None) -> str:
    """The error kind, with what causes it (``ERROR_KINDS``) to read on hover."""
    if not kind:
        return ""
    try:
        info = ERROR_KINDS.get(ErrorKind(kind))
    except ValueError:  # a kind this version does not know (written by another version)
        info = None
    title = f' title="{_e(info.cause)}"' if info else ""
    return f'<span class="kind"{title}>{_e(kind)}</span> '


def _row(s: InstanceStatus, now: datetime) -> str:
    st = state(s)
    error = ""
    if s.last_error or s.last_error_kind:
        text_ = redact(s.last_error or "")
        short = text_ if len(text_) <= 240 else text_[:239] + "…"
        error = f'{_kind(s.last_error_kind)}<span title="{_e(text_)}">{_e(short)}</span>'
        if s.last_instance_state and st in ("failed", "anomaly"):
            error += f'<div class="state">instance state: {_e(s.last_instance_state)}</div>'
        if s.last_action and st in ("failed", "anomaly"):
            error += f'<div class="action">what to do: {_e(s.last_action)}</div>'
    failures = str(s.consecutive_failures) if s.consecutive_failures else MUTED_ZERO
    return (
        f'<tr class="{_e(st)}">'
        f'<td>{_e(s.label)}<span class="id">{s.instance_id}</span></td>'
        f'<td><span class="pill {_e(st)}">{_e(st)}</span></td>'
        f'<td title="{_e(stamp(s.last_run_at))}">{_e(ago(s.last_run_at, now))}</td>'
        f'<td title="{_e(stamp(s.last_success_at))}">{_e(ago(s.last_success_at, now))}</td>'
        f'<td class="num">{s.chats:,}</td>'
        f'<td class="num">{failures}</td>'
        f'<td class="num">{_e(format_ms(s.last_duration_ms))}</td>'
        f'<td class="error">{error}</td>'
        "</tr>"
    )


def render_page(
    statuses: list[InstanceStatus], buckets: list[Bucket], *, now: datetime, max_rows: int = 2000
) -> str:
    """The status page: summary cards, the 24-hour chart, one row per instance."""
    counts = summary(statuses)
    ordered = sorted(statuses, key=_sort_key)
    shown = ordered[:max_rows]
    cards = "".join(
        f'<div class="card {key}"><b>{counts.get(key, 0):,}</b><span>{label}</span></div>'
        for key, label in (
            ("instances", "instances"),
            ("ok", "ok"),
            ("anomaly", "anomaly"),
            ("failed", "failed"),
            ("never", "not synced yet"),
            ("disabled", "disabled"),
        )
        if key != "disabled" or counts["disabled"]
    )
    more = (
        f'<p class="muted">Showing the first {len(shown):,} of {len(ordered):,} instances '
        '(problems first); all of them are in <a href="/status.json">/status.json</a>.</p>'
        if len(shown) < len(ordered)
        else ""
    )
    rows = "".join(_row(s, now) for s in shown) or (
        '<tr><td colspan="8" class="muted">No instances registered yet.</td></tr>'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"/>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}"/>'
        f"<title>chatsync status</title><style>{STYLE}</style></head><body><main>"
        f'<header><h1>chatsync</h1><span class="meta">{counts["instances"]:,} instances · '
        f"as of {_e(stamp(now))} · refreshes every {REFRESH_SECONDS} s</span></header>"
        f'<div class="cards">{cards}</div>'
        '<section class="panel"><h2>Sync runs per half hour, last 24 hours (UTC)</h2>'
        f"{render_chart(buckets)}</section>"
        '<section class="panel"><h2>Instances</h2>'
        "<table><thead><tr><th>Instance</th><th>Status</th><th>Last sync</th>"
        '<th>Last success</th><th class="num">Chats</th><th class="num">Failures in a row</th>'
        '<th class="num">Duration</th><th>Last error</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>{more}</section>"
        '<footer><a href="/status.json">status.json</a> · <a href="/metrics">metrics</a> · '
        '<a href="/healthz">healthz</a> · <a href="/readyz">readyz</a> · '
        f"chatsync {_e(__version__)}</footer>"
        "</main></body></html>\n"
    )

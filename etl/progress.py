"""A one-line progress display for long one-off work (``etl sync --once``) on a terminal.

On a TTY it keeps one line updated: ``synced X/N (ok A, anomaly B, failed C)``. Log lines
written to the same stream meanwhile are printed above it (the line is cleared, the log
line written, the progress line redrawn), so the two never mix. Off a TTY it does nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

from etl.config import Instance
from etl.sync import SyncOutcome

CLEAR = "\r\x1b[K"


class _Passthrough:
    """Wraps a log handler's stream: clear the progress line, write, redraw it."""

    def __init__(self, progress: ProgressLine, stream: TextIO) -> None:
        self._progress = progress
        self._stream = stream

    def write(self, text: str) -> int:
        with self._progress.lock:
            if self._progress.drawn:
                self._stream.write(CLEAR)
            n = self._stream.write(text)
            if text.endswith("\n"):
                self._progress.draw_locked()
            else:
                self._progress.drawn = False
            return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ProgressLine:
    """Counts finished syncs; use as a context manager and ``Syncer`` listener."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.total = total
        self.done = 0
        self.counts: dict[str, int] = {"ok": 0, "anomaly": 0, "failed": 0}
        self.min_interval = min_interval
        self.lock = threading.RLock()
        self.drawn = False
        self._last = 0.0
        self._wrapped: list[tuple[logging.StreamHandler[Any], Any]] = []

    def text(self) -> str:
        c = self.counts
        return (
            f"synced {self.done}/{self.total} "
            f"(ok {c['ok']}, anomaly {c['anomaly']}, failed {c['failed']})"
        )

    def listener(self, _instance: Instance, outcome: SyncOutcome) -> None:
        self.update(outcome.status)

    def update(self, status: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done += 1
            if status in self.counts:
                self.counts[status] += 1
            now = time.monotonic()
            if self.done >= self.total or now - self._last >= self.min_interval:
                self._last = now
                self.draw_locked()

    def draw_locked(self) -> None:
        self.stream.write(CLEAR + self.text())
        self.stream.flush()
        self.drawn = True

    def __enter__(self) -> ProgressLine:
        if self.enabled:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                    old = handler.setStream(_Passthrough(self, self.stream))
                    self._wrapped.append((handler, old))
            with self.lock:
                self.draw_locked()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        for handler, old in self._wrapped:
            handler.setStream(old)
        self._wrapped.clear()
        with self.lock:
            self.draw_locked()
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""Group commit: ticks that finish fetching while others are being written queue up, and
the next thread to write takes them along, in one transaction.

One pool checkout, BEGIN and COMMIT per group instead of per tick. A lone tick is a group
of one, so a quiet daemon behaves as without it; groups grow only when writes queue up.
At most ``writers`` groups are written at once, so that the database works on several and
one slow round trip does not hold up every tick.

Each tick has a future. A tick that finds a writer's slot free writes (its own tick first,
then up to ``limit - 1`` of the queue); otherwise it queues and waits on its future, which
either brings its result (a writer wrote it) or hands it the slot of a writer that
finished and found the queue not empty (the longest waiting tick takes it).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class _YourTurn:
    """The value a waiting tick's future gets when it is handed a writer's slot."""


_YOUR_TURN = _YourTurn()


@dataclass(eq=False, slots=True)
class Queued(Generic[T, R]):
    """One tick waiting to be written; the writer sets its future's result."""

    item: T
    future: Future[R | _YourTurn] = field(default_factory=Future)

    def done(self, result: R) -> None:
        self.future.set_result(result)


class GroupCommit(Generic[T, R]):
    """Writes ``T``s in groups through ``write``, which must set the result of every
    ``Queued`` it is given (and may raise, failing the ones it did not)."""

    def __init__(
        self, write: Callable[[list[Queued[T, R]]], None], *, limit: int, writers: int
    ) -> None:
        self._write = write
        self.limit = limit
        self.writers = writers
        self._lock = threading.Lock()
        self._queue: list[Queued[T, R]] = []
        self._active = 0
        #: how many groups of each size were written (tests and benchmarks read it)
        self.sizes: Counter[int] = Counter()

    def submit(self, item: T) -> R:
        """Write ``item`` (with others, perhaps) and return its result, or raise what
        writing it raised."""
        me: Queued[T, R] = Queued(item)
        with self._lock:
            leads = self._active < self.writers
            if leads:
                self._active += 1
            else:
                self._queue.append(me)
        if not leads:
            got = me.future.result()  # written by another thread, or handed its slot
            if not isinstance(got, _YourTurn):
                return got
            me.future = Future()
        return self._lead(me)

    def _lead(self, me: Queued[T, R]) -> R:
        with self._lock:  # a writer: its own tick first, then what queued up
            batch = [me, *self._queue[: self.limit - 1]]
            del self._queue[: self.limit - 1]
            self.sizes[len(batch)] += 1
        try:
            self._write(batch)
            for queued in batch:
                if not queued.future.done():  # a broken ``write``: never leave a tick waiting
                    queued.future.set_exception(RuntimeError("the group writer set no result"))
        except BaseException as exc:
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            raise
        finally:
            self._hand_over()
        return cast(R, me.future.result())

    def _hand_over(self) -> None:
        """Give this writer's slot to the longest waiting tick, or free it."""
        with self._lock:
            successor = self._queue.pop(0) if self._queue else None
            if successor is None:
                self._active -= 1
        if successor is not None:
            successor.future.set_result(_YOUR_TURN)

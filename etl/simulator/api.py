"""The simulated Green-API service: its state, and how it answers each request.

:class:`GreenApi` holds everything the simulator knows (instances, step counter, faults,
request counters and log) behind one lock. The server threads call :meth:`GreenApi.handle_get`
and :meth:`GreenApi.handle_other`; the :class:`~etl.simulator.Simulator` facade reads and
changes the same state under the same lock. A Green-API method is served when it is in
``GreenApi._methods``; any other path is answered 404.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from etl.simulator.chats import make_chats
from etl.simulator.encoding import dumps
from etl.simulator.faults import Fault, FaultTable, fault_reply
from etl.simulator.instance import Instance, Scenario
from etl.simulator.replies import JSON, TEXT, Reply

#: ``/waInstance{id}/{method}/{token}``
_PATH_RE: Final = re.compile(r"^/waInstance(\d{1,19})/([^/]+)/([^/]+)$")
_REDACT_RE: Final = re.compile(r"(/waInstance[^/\s\"]*/[^/\s\"]*/)[^\s?#\"]*")
_MAX_LOG: Final = 100_000
#: Generated bodies of ``huge`` faults kept at once (each is large).
_MAX_HUGE_CACHE: Final = 4


def redact(text: str) -> str:
    """Replace the token segment of any Green-API style path with ``***``."""
    return _REDACT_RE.sub(r"\1***", text)


@dataclass(frozen=True)
class RequestLog:
    """One request the simulator received (the token never appears in it).

    ``count`` is the ``?count=`` query value (None if absent or not an integer); ``served`` is
    the number of chats in a JSON-array answer (None for other answers).
    """

    id_instance: int | None
    path_redacted: str
    status: int
    count: int | None
    at: float
    served: int | None = None


#: A Green-API method: (instance id, token, query string, raw path) -> the answer.
_Method = Callable[[int, str, str, str], Reply]


class GreenApi:
    """State of the simulated service, and the answers to requests (from server threads)."""

    def __init__(self, scenario: Scenario, instances: dict[int, Instance]) -> None:
        self.scenario = scenario
        self.instances = instances  # fixed after construction: read without the lock
        self.lock = threading.RLock()
        self.steps = 0
        self.faults = FaultTable()
        self.counts: dict[int, int] = {}
        self.log: deque[RequestLog] = deque(maxlen=_MAX_LOG)
        #: Set when the server stops, to cut short the delays of faults in progress.
        self.stopping = threading.Event()
        self._huge_cache: dict[tuple[int, int], bytes] = {}
        self._methods: dict[str, _Method] = {"getChats": self._get_chats}

    # --- routing -------------------------------------------------------------------------

    def handle_get(self, raw_path: str) -> Reply:
        """The answer to a GET of ``raw_path`` (path and query, as received)."""
        parts = urlsplit(raw_path)
        match = _PATH_RE.match(parts.path)
        method = self._methods.get(match.group(2)) if match is not None else None
        if match is None or method is None:
            return self.handle_other(raw_path)
        return method(int(match.group(1)), unquote(match.group(3)), parts.query, raw_path)

    def handle_other(self, path: str) -> Reply:
        """The answer to any request that is not a served Green-API method."""
        reply = Reply(404, b"Not Found", TEXT)
        self._record(None, path, None, reply)
        return reply

    # --- getChats --------------------------------------------------------------------------

    def _get_chats(self, id_instance: int, token: str, query: str, path: str) -> Reply:
        count, count_ok = _parse_count(query)
        reply = self._answer_get_chats(id_instance, token, count, count_ok)
        self._record(id_instance, path, count, reply)
        return reply

    def _answer_get_chats(
        self, id_instance: int, token: str, count: int | None, count_ok: bool
    ) -> Reply:
        # Counted and faulted before the id and the token are checked, so a fault applies to
        # any id, served or not: it stands in for trouble on the way to the instance.
        with self.lock:
            self.counts[id_instance] = self.counts.get(id_instance, 0) + 1
            fault = self.faults.take(id_instance)
        if fault is not None:
            faulted = self._fault_answer(fault, id_instance)
            if faulted is not None:
                return faulted
        inst = self.instances.get(id_instance)
        if inst is None:
            return Reply(403, b"Forbidden", TEXT)
        if token != inst.token:
            return Reply(401, b"Unauthorized", TEXT)
        if not count_ok:
            return Reply(400, b'{"message":"bad request data"}', JSON)
        body, served = self.payload(inst, count)
        return Reply(200, body, JSON, served=served)

    def _fault_answer(self, fault: Fault, id_instance: int) -> Reply | None:
        """The fault's answer after its delay; None when it only delays the normal answer."""
        if fault.delay > 0 and self.stopping.wait(fault.delay):
            return Reply(503, b"", "text/plain")  # stopping: do not hold the server up
        if fault.is_pure_delay:
            return None
        return fault_reply(fault, id_instance, self)

    def _record(self, id_instance: int | None, path: str, count: int | None, reply: Reply) -> None:
        entry = RequestLog(
            id_instance, redact(path), reply.status, count, time.monotonic(), reply.served
        )
        with self.lock:
            self.log.append(entry)

    # --- bodies ----------------------------------------------------------------------------

    def payload(self, inst: Instance, count: int | None) -> tuple[bytes, int]:
        """Serialised chats (cached until the state changes) and how many were included."""
        with self.lock:
            return inst.payload(self.steps, count)

    def chats_body(self, id_instance: int) -> bytes:
        """The instance's full list, serialised (``[]`` for an id that is not simulated)."""
        inst = self.instances.get(id_instance)
        return self.payload(inst, None)[0] if inst is not None else b"[]"

    def huge_body(self, id_instance: int, huge_count: int) -> bytes:
        """``huge_count`` generated chats, the same for the same seed, id and count."""
        key = (id_instance, huge_count)
        with self.lock:
            cached = self._huge_cache.get(key)
        if cached is not None:
            return cached
        # Generated outside the lock: other instances keep being served meanwhile.
        rng = random.Random(f"chatsync-sim-huge:{self.scenario.seed}:{id_instance}")
        taken: set[str] = set()
        body = dumps(make_chats(rng, self.scenario.anchor, taken, huge_count))
        with self.lock:
            if len(self._huge_cache) >= _MAX_HUGE_CACHE:
                self._huge_cache.clear()
            self._huge_cache[key] = body
        return body


def _parse_count(query: str) -> tuple[int | None, bool]:
    """The ``count`` query parameter, and whether it is acceptable (absent, or an int > 0)."""
    values = parse_qs(query, keep_blank_values=True).get("count")
    if values is None:
        return None, True
    try:
        count = int(values[0])
    except ValueError:
        return None, False
    return count, count > 0

"""The simulated Green-API service: its state, and how it answers each request.

:class:`GreenApi` holds everything the simulator knows (instances, step counter, faults,
request counters and log) behind one lock. The server threads call :meth:`GreenApi.handle_get`,
:meth:`GreenApi.handle_post` and :meth:`GreenApi.handle_other`; the
:class:`~etl.simulator.Simulator` facade reads and changes the same state under the same lock.
A Green-API method is served when it is in ``GreenApi._methods`` (GET) or
``GreenApi._posts`` (POST); any other path is answered 404.

Served: ``getChats`` (the instance's list, in its account's form; a 400 while the account is
not authorized), ``getStateInstance`` (``{"stateInstance": ...}``) and ``checkWhatsapp``
(``{"existsWhatsapp": true, "chatId": "<lid>"}`` for a phone number, at most 10 requests a
second per instance, as Green-API's rate limiter documents, and within the instance's
quota, past which it answers 466 with the documented body).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from etl.simulator import forms
from etl.simulator.chats import make_chats
from etl.simulator.encoding import dumps
from etl.simulator.faults import Fault, FaultTable, fault_reply
from etl.simulator.instance import Instance, Scenario
from etl.simulator.replies import JSON, TEXT, Reply, quota_body

_log = logging.getLogger("etl.simulator")

#: ``/waInstance{id}/{method}/{token}``
_PATH_RE: Final = re.compile(r"^/waInstance(\d{1,19})/([^/]+)/([^/]+)$")
_REDACT_RE: Final = re.compile(r"(/waInstance[^/\s\"]*/[^/\s\"]*/)[^\s?#\"]*")
_MAX_LOG: Final = 100_000
#: Generated bodies of ``huge`` faults kept at once (each is large).
_MAX_HUGE_CACHE: Final = 4
#: checkWhatsapp requests per second per instance (Green-API's "ratelimiter" page)
CHECK_RATE: Final = 10


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
    #: the Green-API method (``getChats``, ``getStateInstance``, ``checkWhatsapp``)
    method: str | None = None


#: A Green-API method: (instance id, token, query string, raw path) -> the answer.
_Method = Callable[[int, str, str, str], Reply]
#: A Green-API method called by POST: (instance id, token, body, raw path) -> the answer.
_Post = Callable[[int, str, bytes, str], Reply]


def _phone_of(body: bytes) -> int | None:
    """The number a checkWhatsapp body asks about: ``phoneNumber`` (an integer), or
    ``chatId`` as ``<digits>@c.us`` or bare digits (the newer form)."""
    try:
        data: Any = json.loads(body or b"null")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    number, chat_id = data.get("phoneNumber"), data.get("chatId")
    if isinstance(number, int) and not isinstance(number, bool) and number > 0:
        return number
    if isinstance(chat_id, str):
        digits = chat_id.removesuffix("@c.us")
        if digits.isascii() and digits.isdigit():
            return int(digits)
    return None


class GreenApi:
    """State of the simulated service, and the answers to requests (from server threads)."""

    def __init__(self, scenario: Scenario, instances: dict[int, Instance]) -> None:
        self.scenario = scenario
        self.instances = instances  # fixed after construction: read without the lock
        self.lock = threading.RLock()
        self.steps = 0
        self.faults = FaultTable()
        #: faults of the other methods, by method
        self.method_faults: dict[str, FaultTable] = {}
        self.counts: dict[int, int] = {}
        #: requests of every method, by (method, instance id)
        self.method_counts: Counter[tuple[str, int]] = Counter()
        self.log: deque[RequestLog] = deque(maxlen=_MAX_LOG)
        #: Set when the server stops, to cut short the delays of faults in progress.
        self.stopping = threading.Event()
        self._huge_cache: dict[tuple[int, int], bytes] = {}
        self._methods: dict[str, _Method] = {
            "getChats": self._get_chats,
            "getStateInstance": self._get_state,
        }
        self._posts: dict[str, _Post] = {"checkWhatsapp": self._check_whatsapp}
        #: called by the server with each request's log entry once its answer is on the
        #: wire (tests act at that instant, e.g. stop the process that asked)
        self.answered: list[Callable[[RequestLog], None]] = []

    def notify_answered(self, reply: Reply) -> None:
        """Run the ``answered`` hooks for a reply just written (errors are logged)."""
        if not self.answered or not isinstance(reply.logged, RequestLog):
            return
        for hook in list(self.answered):
            try:
                hook(reply.logged)
            except Exception:
                _log.exception("simulator: an answered hook failed")

    # --- routing -------------------------------------------------------------------------

    def handle_get(self, raw_path: str) -> Reply:
        """The answer to a GET of ``raw_path`` (path and query, as received)."""
        parts = urlsplit(raw_path)
        match = _PATH_RE.match(parts.path)
        method = self._methods.get(match.group(2)) if match is not None else None
        if match is None or method is None:
            return self.handle_other(raw_path)
        return method(int(match.group(1)), unquote(match.group(3)), parts.query, raw_path)

    def handle_post(self, raw_path: str, body: bytes) -> Reply:
        """The answer to a POST of ``raw_path`` with ``body``."""
        match = _PATH_RE.match(urlsplit(raw_path).path)
        method = self._posts.get(match.group(2)) if match is not None else None
        if match is None or method is None:
            return self.handle_other(raw_path)
        return method(int(match.group(1)), unquote(match.group(3)), body, raw_path)

    def handle_other(self, path: str) -> Reply:
        """The answer to any request that is not a served Green-API method."""
        reply = Reply(404, b"Not Found", TEXT)
        self._record(None, path, None, reply, None)
        return reply

    # --- getChats --------------------------------------------------------------------------

    def _get_chats(self, id_instance: int, token: str, query: str, path: str) -> Reply:
        count, count_ok = _parse_count(query)
        reply = self._answer_get_chats(id_instance, token, count, count_ok)
        self._record(id_instance, path, count, reply)
        return reply

    def _other_method(
        self, method: str, id_instance: int, token: str, path: str
    ) -> tuple[Instance | None, Reply | None]:
        """Count, fault and authenticate a request of a method other than getChats: the
        instance, or the answer to give instead."""
        with self.lock:
            self.method_counts[(method, id_instance)] += 1
            table = self.method_faults.get(method)
            fault = table.take(id_instance) if table is not None else None
        reply = self._fault_answer(fault, id_instance) if fault is not None else None
        inst = self.instances.get(id_instance)
        if reply is None and inst is None:
            reply = Reply(403, b"Forbidden", TEXT)
        elif reply is None and inst is not None and token != inst.token:
            reply = Reply(401, b"Unauthorized", TEXT)
        if reply is not None:
            self._record(id_instance, path, None, reply, method)
        return inst, reply

    def _get_state(self, id_instance: int, token: str, query: str, path: str) -> Reply:
        inst, reply = self._other_method("getStateInstance", id_instance, token, path)
        if reply is None:
            assert inst is not None
            with self.lock:
                state = inst.state
            reply = Reply(200, dumps({"stateInstance": state}), JSON)
            self._record(id_instance, path, None, reply, "getStateInstance")
        return reply

    def _check_whatsapp(self, id_instance: int, token: str, body: bytes, path: str) -> Reply:
        inst, reply = self._other_method("checkWhatsapp", id_instance, token, path)
        if reply is None:
            assert inst is not None
            reply = self._answer_check(inst, body)
            self._record(id_instance, path, None, reply, "checkWhatsapp")
        return reply

    def _answer_check(self, inst: Instance, body: bytes) -> Reply:
        """checkWhatsapp: rate limit, quota, then the person's lid (any valid number is on
        WhatsApp here; its lid is derived from the number, as ``forms.lid_of``)."""
        now = time.monotonic()
        with self.lock:
            inst.check_times = [t for t in inst.check_times if now - t < 1.0]
            if len(inst.check_times) >= CHECK_RATE:
                return Reply(429, b"Too Many Requests", TEXT)
            inst.check_times.append(now)
            if inst.check_quota is not None and inst.check_used >= inst.check_quota:
                return Reply(
                    466, quota_body("checkwhatsapp", inst.check_used, inst.check_quota), JSON
                )
            inst.check_used += 1
        phone = _phone_of(body)
        if phone is None:
            return Reply(400, b"Validation failed", TEXT)
        answer = {
            "existsWhatsapp": True,
            "chatId": forms.lid_of(f"{phone}@c.us", self.scenario.seed),
        }
        return Reply(200, dumps(answer), JSON)

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
        with self.lock:
            state, state_text = inst.state, inst.state_text
        if state != "authorized":
            return Reply(400, state_text, TEXT)
        body, served = self.payload(inst, count)
        return Reply(200, body, JSON, served=served)

    def _fault_answer(self, fault: Fault, id_instance: int) -> Reply | None:
        """The fault's answer after its delay; None when it only delays the normal answer."""
        if fault.delay > 0 and self.stopping.wait(fault.delay):
            return Reply(503, b"", "text/plain")  # stopping: do not hold the server up
        if fault.is_pure_delay:
            return None
        return fault_reply(fault, id_instance, self)

    def _record(
        self,
        id_instance: int | None,
        path: str,
        count: int | None,
        reply: Reply,
        method: str | None = "getChats",
    ) -> None:
        entry = RequestLog(
            id_instance, redact(path), reply.status, count, time.monotonic(), reply.served, method
        )
        reply.logged = entry
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

"""The HTTP transport under the Green-API client: one GET in, status, headers and body out.

The client (``etl.client``) decides what to ask (URL, timeouts, deadline), whether to
try again and what an answer means; this module only moves bytes, with ``requests``:
one pooled session, a request prepared once per URL, the environment's proxy settings
read once per base URL, the body read to the end under a deadline that a watchdog
thread enforces. The interface is :class:`Transport`, modelled on httpx's
``BaseTransport``: it knows nothing of Green-API, retries or error kinds.

A failure below HTTP is a :class:`TransportError` whose message is the library's
exception class name alone. Its ``detail`` is the library's text, which may hold the
URL and so the token: whoever shows it must redact it first (the client does).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

#: prepared requests kept at most (then forgotten all at once): more means tokens or
#: URLs replaced many times over
MAX_PREPARED = 65536
CHUNK_BYTES = 256 * 1024

_Key = tuple[str, tuple[tuple[str, str], ...]]  # (url, query parameters)


@dataclass(frozen=True, slots=True)
class Request:
    """One request of ``base + path``: a GET, or a POST of a JSON ``body``.

    ``timeout`` is (connect, read) in seconds, the read timeout applying to each
    receive; ``deadline`` (``time.monotonic()``) bounds the whole exchange, body
    included. ``base`` is the API server's URL: the environment's settings are read
    once per base.
    """

    base: str
    path: str
    params: Mapping[str, str] | None
    timeout: tuple[float, float]
    deadline: float
    method: str = "GET"
    #: a JSON body (sent with ``Content-Type: application/json``)
    body: bytes | None = None

    @property
    def url(self) -> str:
        return self.base + self.path


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer: ``headers`` is case-insensitive, ``body`` read to the end."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class TransportError(Exception):
    """No complete HTTP answer (refused, reset, bad TLS, ...).

    The message is ``name``, the library's exception class. ``detail`` is the library's
    text, unredacted: it may contain the URL, and so the token.
    """

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name)
        self.name = name
        self.detail = detail


class TransportTimeout(TransportError):
    """No answer within the timeouts, or the body did not arrive before the deadline."""


class BodyTooLarge(Exception):
    """The body grew beyond the transport's ``max_body_bytes``; nothing more is read."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.status = status
        self.limit = limit


class Transport(Protocol):
    """What the client needs from HTTP: send one request, get one whole answer."""

    def send(self, request: Request) -> Response:
        """The answer, whatever its status. Raises TransportTimeout, TransportError or
        BodyTooLarge. Redirects are never followed."""
        ...

    def close(self) -> None: ...


class RequestsTransport:
    """``Transport`` over one pooled ``requests.Session``. Thread-safe."""

    def __init__(
        self,
        *,
        pool_maxsize: int = 16,
        headers: Mapping[str, str] | None = None,
        max_body_bytes: int,
    ) -> None:
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_maxsize, pool_maxsize=pool_maxsize)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update(headers or {})
        self.max_body_bytes = max_body_bytes
        #: per (url, params): the request, prepared once (see ``_send``)
        self._prepared: dict[_Key, requests.PreparedRequest] = {}
        #: per base URL: proxies, CA bundle etc. from the environment (see ``_send``)
        self._settings: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self._session.close()

    def send(self, request: Request) -> Response:
        try:
            response = self._send(request)
            try:
                body = self._read_body(response, deadline=request.deadline)
            finally:
                response.close()
        except requests.Timeout as exc:
            raise TransportTimeout(type(exc).__name__, str(exc)) from None
        except requests.RequestException as exc:
            raise TransportError(type(exc).__name__, str(exc)) from None
        return Response(status=response.status_code, headers=response.headers, body=body)

    def _send(self, request: Request) -> requests.Response:
        """Send the request through the session's adapter, as ``Session.get(url,
        stream=True, allow_redirects=False)`` would, without the per-request work that
        cannot change between two polls of one instance.

        ``Session.request`` prepares the request again (merging headers, cookies, hooks and
        re-parsing the URL) and reads the proxy variables from ``os.environ`` on every
        call, and a session's cookie jar has nothing to do here: work that would be
        redone at every poll of every instance for the same result. The request is
        prepared once per URL, the environment's settings are read once per base URL (at
        its first request: proxy variables set later are not seen), and redirects are
        never followed.
        """
        url = request.url
        prepared = self._prepare(request)
        settings = self._settings.get(request.base)
        if settings is None:
            env = self._session.merge_environment_settings(request.base, {}, True, None, None)
            settings = self._settings[request.base] = dict(env)
        return self._session.get_adapter(url).send(
            prepared,
            stream=True,
            timeout=request.timeout,
            verify=settings["verify"],
            cert=settings["cert"],
            proxies=settings["proxies"],
        )

    def _prepare(self, request: Request) -> requests.PreparedRequest:
        """The prepared request: a GET once per URL and query, a POST (its own body each
        time) every time."""
        params = dict(request.params) if request.params else None
        if request.method != "GET":
            return self._session.prepare_request(
                requests.Request(
                    request.method,
                    request.url,
                    params=params,
                    data=request.body,
                    headers={"Content-Type": "application/json"},
                )
            )
        key = (request.url, tuple(request.params.items()) if request.params else ())
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= MAX_PREPARED:
                self._prepared.clear()
            prepared = self._prepared[key] = self._session.prepare_request(
                requests.Request("GET", request.url, params=params)
            )
        return prepared

    def _read_body(self, response: requests.Response, *, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        # A read of one chunk blocks until the chunk is full, however slowly the bytes trickle
        # in (the read timeout is per recv): at the deadline, the watchdog cuts the socket.
        watch = _WATCHDOG.watch(deadline, response)
        try:
            for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise BodyTooLarge(response.status_code, self.max_body_bytes)
                if time.monotonic() > deadline:
                    raise requests.Timeout("body not received within the time budget")
        except requests.RequestException:
            if time.monotonic() >= deadline:
                raise requests.Timeout("body not received within the time budget") from None
            raise
        finally:
            _WATCHDOG.cancel(watch)
        return b"".join(chunks)


def _cut(response: requests.Response) -> None:
    """Unblock a body read in another thread (urllib3 >= 2.3); harmless once it is done."""
    shutdown = getattr(response.raw, "shutdown", None)
    if shutdown is not None:
        with contextlib.suppress(Exception):
            shutdown()


class _Watchdog:
    """One thread that cuts the body reads still running at their deadline (``_cut``).

    A ``threading.Timer`` per request would start a thread per request, a cost paid on
    every poll of every instance. Here a request adds an entry to a heap; the thread
    sleeps until the earliest deadline, and is woken only when a new entry is earlier
    than every other (rare: deadlines are "now + budget").
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread is not forked

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, list[requests.Response | None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, response: requests.Response) -> list[requests.Response | None]:
        """Cut ``response`` at ``deadline`` (``time.monotonic()``) unless cancelled first."""
        entry: list[requests.Response | None] = [response]
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="chatsync-body-watchdog", daemon=True
                )
                self._thread.start()
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._seq), entry))
            if earliest:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[requests.Response | None]) -> None:
        """Once this returns, the response is never cut (its connection may go back to
        the pool and serve another request)."""
        with self._cond:
            entry[0] = None  # the thread drops the entry when its deadline comes

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    response = heapq.heappop(self._heap)[2][0]
                    if response is not None:
                        _cut(response)  # a socket shutdown: quick, so under the lock


_WATCHDOG = _Watchdog()

"""Green-API HTTP client: URL building, timeouts, retries, error mapping, redaction.

The token lives in the URL path, so this module never lets a URL or a library
exception text escape unredacted: every error message is built here from the
host, the status and a redacted reason.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from etl import USER_AGENT
from etl.config import Instance
from etl.errors import ApiError, ErrorKind, PayloadError
from etl.redact import install_log_redaction, redact

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 499, 500, 502, 503, 504})
MAX_BODY_BYTES = 256 * 1024 * 1024
#: share of the poll interval that one sync (all attempts and waits) may spend on HTTP
BUDGET_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class FetchResult:
    body: bytes
    http_status: int
    attempts: int


def classify_400(text: str) -> ErrorKind:
    """Map the text of a Green-API 400 answer to an ``error_kind``."""
    low = text.lower()
    if "starting process" in low:
        return ErrorKind.STARTING
    if "not authorized" in low:
        return ErrorKind.NOT_AUTHORIZED
    if "expired" in low or "deleted" in low:
        return ErrorKind.EXPIRED
    return ErrorKind.BAD_REQUEST


_STATUS_KINDS = {
    401: ErrorKind.UNAUTHORIZED,
    403: ErrorKind.FORBIDDEN,
    404: ErrorKind.NOT_FOUND,
    429: ErrorKind.RATE_LIMITED,
    466: ErrorKind.QUOTA_EXCEEDED,
}


def _status_kind(status: int) -> tuple[ErrorKind, bool]:
    """(error_kind, retried within the tick) for a non-200 status other than 400."""
    kind = _STATUS_KINDS.get(status)
    if kind is None:
        if status in RETRYABLE_STATUSES or status >= 500:
            kind = ErrorKind.SERVER_ERROR
        elif status >= 400:
            kind = ErrorKind.BAD_REQUEST
        else:
            kind = ErrorKind.BAD_PAYLOAD
    # of the server errors, only the statuses a retry may cure
    return kind, kind.info.retried and (
        kind != ErrorKind.SERVER_ERROR or status in RETRYABLE_STATUSES
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_detail(status: int, body: bytes) -> str:
    text = body[:4096].decode("utf-8", "replace")
    if status == 466:  # quota: report the statuses Green-API puts in the JSON body
        try:
            data: Any = orjson.loads(body)
            parts = [
                f"{k}={data[k].get('status')}"
                for k in ("invokeStatus", "correspondentsStatus")
                if isinstance(data, dict) and isinstance(data.get(k), dict)
            ]
            if parts:  # the statuses are the server's text: mask them like any other
                return _short(redact(", ".join(parts)), 200)
        except orjson.JSONDecodeError:
            pass
    return _short(redact(text), 200)


class GreenApiClient:
    """Fetches getChats for any configured instance. Thread-safe; one pooled session."""

    def __init__(
        self,
        *,
        pool_maxsize: int = 16,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        # urllib3 logs request paths (and so the token) at DEBUG: mask them whoever set up
        # logging, not only when the command line did.
        install_log_redaction()
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_maxsize, pool_maxsize=pool_maxsize)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        # exponential backoff plus up to one base step of random jitter
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + (
            wait_random(0, backoff_initial)
        )
        self._stop = threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        #: per (url, count): the request, prepared once (see ``_send``)
        self._prepared: dict[tuple[str, int | None], requests.PreparedRequest] = {}
        #: per API URL: proxies, CA bundle etc. from the environment (see ``_send``)
        self._settings: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self._session.close()

    def interrupt(self) -> None:
        """Cut retry waits short (used at shutdown); attempts in flight still finish."""
        self._stop.set()

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def get_chats(self, instance: Instance, *, budget_seconds: float | None = None) -> FetchResult:
        """GET getChats with retries on transient failures, bounded by ``budget_seconds``.

        Raises ApiError (with ``error_kind``, ``http_status`` and ``attempts``) on failure.
        """
        budget = (
            budget_seconds
            if budget_seconds is not None
            else (instance.interval_seconds * BUDGET_SHARE)
        )
        deadline = time.monotonic() + budget
        attempts = 0

        last_error: ApiError | None = None
        host = urlsplit(instance.api_url).netloc

        def attempt() -> FetchResult:
            nonlocal attempts, last_error
            if last_error is not None and self._stop.is_set():
                last_error.retryable = False  # shutting down: no more retries
                raise last_error
            if deadline - time.monotonic() <= 0:  # a late wake-up: nothing is sent, so
                # it is not an attempt (``attempts`` counts HTTP requests)
                raise ApiError(
                    f"getChats on {host}: time budget exhausted",
                    error_kind=ErrorKind.TIMEOUT,
                    retryable=False,
                )
            attempts += 1
            try:
                return self._attempt(instance, deadline=deadline, attempt=attempts)
            except ApiError as exc:
                last_error = exc
                raise

        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, ApiError) and e.retryable),
            stop=(
                stop_after_attempt(instance.max_attempts)
                | stop_before_delay(budget)
                | stop_when_event_set(self._stop)
            ),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._log_retry(instance),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except ApiError as exc:
            exc.attempts = attempts
            raise
        except PayloadError as exc:
            exc.attempts = attempts
            raise

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))

    @staticmethod
    def _log_retry(instance: Instance) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "instance %s: attempt %d failed (%s), retrying in %.1fs",
                instance.id_instance,
                state.attempt_number,
                exc,
                wait,
            )

        return before_sleep

    def _attempt(self, instance: Instance, *, deadline: float, attempt: int) -> FetchResult:
        host = urlsplit(instance.api_url).netloc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError(
                f"getChats on {host}: time budget exhausted",
                error_kind=ErrorKind.TIMEOUT,
                retryable=False,
            )
        url = (
            f"{instance.api_url}/waInstance{instance.id_instance}/getChats/"
            f"{instance.token.get_secret_value()}"
        )
        timeout = (
            min(instance.connect_timeout_seconds, remaining),
            min(instance.timeout_seconds, remaining),
        )
        try:
            response = self._send(instance, url, timeout)
            try:
                body = self._read_body(response, deadline=deadline, host=host)
            finally:
                response.close()
        except requests.Timeout as exc:
            raise ApiError(
                f"getChats on {host}: timed out ({type(exc).__name__})",
                error_kind=ErrorKind.TIMEOUT,
                retryable=True,
            ) from None
        except requests.RequestException as exc:
            raise ApiError(
                f"getChats on {host}: {type(exc).__name__}: {_short(redact(str(exc)))}",
                error_kind=ErrorKind.CONNECTION,
                retryable=True,
            ) from None

        status = response.status_code
        if status == 200:
            return FetchResult(body=body, http_status=status, attempts=attempt)
        if status == 400:
            text = body[:4096].decode("utf-8", "replace")
            kind = classify_400(text)
            retryable = kind.info.retried
        else:
            kind, retryable = _status_kind(status)
        raise ApiError(
            f"getChats on {host}: HTTP {status}: {_error_detail(status, body)}",
            error_kind=kind,
            http_status=status,
            retryable=retryable,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )

    def _send(
        self, instance: Instance, url: str, timeout: tuple[float, float]
    ) -> requests.Response:
        """GET ``url`` through the session's adapter, as ``Session.get(url, stream=True,
        allow_redirects=False)`` would, without the per-request work that cannot change
        between two polls of one instance.

        ``Session.request`` prepares the request again (merging headers, cookies, hooks and
        re-parsing the URL) and reads the proxy variables from ``os.environ`` on every
        call, and a session's cookie jar has nothing to do here: that was about 14 % of
        this process's CPU in a steady tick at 1,000 x 500 (py-spy). The request is
        prepared once per URL, the environment's settings are read once per API URL (at
        its first request: proxy variables set later are not seen), and redirects are
        never followed, as before.
        """
        key = (url, instance.count)
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= 65536:  # tokens or URLs replaced many times over
                self._prepared.clear()
            params = {"count": str(instance.count)} if instance.count else None
            request = requests.Request("GET", url, params=params)
            prepared = self._prepared[key] = self._session.prepare_request(request)
        settings = self._settings.get(instance.api_url)
        if settings is None:
            env = self._session.merge_environment_settings(instance.api_url, {}, True, None, None)
            settings = self._settings[instance.api_url] = dict(env)
        return self._session.get_adapter(url).send(
            prepared,
            stream=True,
            timeout=timeout,
            verify=settings["verify"],
            cert=settings["cert"],
            proxies=settings["proxies"],
        )

    @staticmethod
    def _read_body(response: requests.Response, *, deadline: float, host: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        # A read of one chunk blocks until the chunk is full, however slowly the bytes trickle
        # in (the read timeout is per recv): at the deadline, the watchdog cuts the socket.
        watch = _WATCHDOG.watch(deadline, response)
        try:
            for chunk in response.iter_content(chunk_size=256 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PayloadError(
                        f"getChats on {host}: body larger than {MAX_BODY_BYTES} bytes",
                        http_status=response.status_code,
                    )
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

    A ``threading.Timer`` per request started a thread per request: ~4 % of this
    process's CPU in a steady tick at 1,000 x 500 (py-spy). Here a request adds an entry
    to a heap; the thread sleeps until the earliest deadline, and is woken only when a
    new entry is earlier than every other (rare: deadlines are "now + budget").
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

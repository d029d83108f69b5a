"""Green-API HTTP client: URL building, timeouts, retries, error mapping, redaction.

The bytes move through a ``Transport`` (``etl.transport``): one request in, status,
headers and body out. Everything that makes it Green-API is here.

The token lives in the URL path, so this module never lets a URL or a library
exception text escape unredacted: every error message is built here from the
host, the status and a redacted reason.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
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
from etl.transport import (
    BodyTooLarge,
    Request,
    RequestsTransport,
    Response,
    Transport,
    TransportError,
    TransportTimeout,
)

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
    """Fetches getChats for any configured instance. Thread-safe (as the default transport
    is: one pooled session)."""

    def __init__(
        self,
        *,
        pool_maxsize: int = 16,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        sleep: Callable[[float], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        """``transport``: how requests are sent (default: a pool of ``pool_maxsize``
        connections over ``requests``); the client closes it in ``close()``."""
        # urllib3 logs request paths (and so the token) at DEBUG: mask them whoever set up
        # logging, not only when the command line did.
        install_log_redaction()
        self._transport = transport or RequestsTransport(
            pool_maxsize=pool_maxsize,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            max_body_bytes=MAX_BODY_BYTES,
        )
        # exponential backoff plus up to one base step of random jitter
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + (
            wait_random(0, backoff_initial)
        )
        self._stop = threading.Event()
        self._sleep = sleep or self._interruptible_sleep

    def close(self) -> None:
        self._transport.close()

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
        request = Request(
            base=instance.api_url,
            path=f"/waInstance{instance.id_instance}/getChats/{instance.token.get_secret_value()}",
            params={"count": str(instance.count)} if instance.count else None,
            timeout=(
                min(instance.connect_timeout_seconds, remaining),
                min(instance.timeout_seconds, remaining),
            ),
            deadline=deadline,
        )
        try:
            response = self._transport.send(request)
        except TransportTimeout as exc:
            raise ApiError(
                f"getChats on {host}: timed out ({exc.name})",
                error_kind=ErrorKind.TIMEOUT,
                retryable=True,
            ) from None
        except TransportError as exc:
            raise ApiError(
                f"getChats on {host}: {exc.name}: {_short(redact(exc.detail))}",
                error_kind=ErrorKind.CONNECTION,
                retryable=True,
            ) from None
        except BodyTooLarge as exc:
            raise PayloadError(
                f"getChats on {host}: body larger than {exc.limit} bytes",
                http_status=exc.status,
            ) from None
        if response.status == 200:
            return FetchResult(body=response.body, http_status=200, attempts=attempt)
        raise _status_error(host, response)


def _status_error(host: str, response: Response) -> ApiError:
    """The ApiError for an answer other than 200."""
    status, body = response.status, response.body
    if status == 400:
        kind = classify_400(body[:4096].decode("utf-8", "replace"))
        retryable = kind.info.retried
    else:
        kind, retryable = _status_kind(status)
    return ApiError(
        f"getChats on {host}: HTTP {status}: {_error_detail(status, body)}",
        error_kind=kind,
        http_status=status,
        retryable=retryable,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )

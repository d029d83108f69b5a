"""Green-API HTTP client: URL building, timeouts, retries, error mapping, redaction.

The bytes move through a ``Transport`` (``etl.transport``): one request in, status,
headers and body out. Everything that makes it Green-API is here: getChats (retried within
the tick's budget), getStateInstance (asked once, to tell the two meanings of an
ambiguous 400 apart) and checkWhatsapp (one lookup, for linking a chat's changed id).
What the error bodies say is read by ``etl.answers``.

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
from etl.answers import STATE_KINDS, classify_400, detail, is_ambiguous_400, short
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


@dataclass(frozen=True, slots=True)
class CheckResult:
    """checkWhatsapp's answer: whether the number is on WhatsApp, and the id it names the
    person by (a lid, where the account has one)."""

    exists: bool
    chat_id: str | None


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
            if exc.ambiguous:
                self._classify_by_state(instance, exc, deadline)
            raise
        except PayloadError as exc:
            exc.attempts = attempts
            raise

    def _classify_by_state(self, instance: Instance, exc: ApiError, deadline: float) -> None:
        """An ambiguous 400 ("starting or not authorized"): ask getStateInstance once, and
        make ``exc`` the kind of the real state. When the state cannot be had, it is the
        transient reading (``starting``): a restart is the common cause, and a phone that
        stays unlinked backs off after a few failures anyway."""
        try:
            state = self.get_state(instance, deadline=deadline)
        except (ApiError, PayloadError) as err:
            exc.error_kind = ErrorKind.STARTING
            exc.args = (f"{exc.message}; getStateInstance failed: {err.message}",)
            return
        exc.instance_state = state
        exc.error_kind = STATE_KINDS.get(state, ErrorKind.STARTING)
        exc.args = (f"{exc.message}; getStateInstance: {short(redact(state), 40)}",)

    def get_state(self, instance: Instance, *, deadline: float | None = None) -> str:
        """``stateInstance`` from getStateInstance: one attempt, within ``deadline`` (or the
        instance's timeouts). Raises ApiError or PayloadError."""
        deadline = deadline if deadline is not None else time.monotonic() + instance.timeout_seconds
        response = self._send(instance, "getStateInstance", deadline=deadline)
        try:
            data: Any = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            data = None
        state = data.get("stateInstance") if isinstance(data, dict) else None
        if not isinstance(state, str) or not state:
            raise PayloadError(
                f"getStateInstance on {_host(instance)}: no stateInstance in the answer"
            )
        return state

    def check_whatsapp(
        self, instance: Instance, phone_id: str, *, deadline: float | None = None
    ) -> CheckResult:
        """checkWhatsapp for a phone-number id (``79001234567@c.us``): one attempt. The
        number goes as ``phoneNumber``, the field every version of the method reads; the
        answer's ``chatId`` is the person's lid where Green-API gives one. Raises ApiError
        or PayloadError."""
        digits = phone_id.split("@", 1)[0]
        deadline = deadline if deadline is not None else time.monotonic() + instance.timeout_seconds
        body = orjson.dumps({"phoneNumber": int(digits)})
        response = self._send(instance, "checkWhatsapp", deadline=deadline, body=body)
        try:
            data: Any = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            data = None
        exists = data.get("existsWhatsapp") if isinstance(data, dict) else None
        if not isinstance(exists, bool):
            raise PayloadError(
                f"checkWhatsapp on {_host(instance)}: no existsWhatsapp in the answer"
            )
        chat_id = data.get("chatId")
        return CheckResult(exists, chat_id if isinstance(chat_id, str) and chat_id else None)

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
        params = {"count": str(instance.count)} if instance.count else None
        response = self._send(instance, "getChats", deadline=deadline, params=params)
        return FetchResult(body=response.body, http_status=200, attempts=attempt)

    def _send(
        self,
        instance: Instance,
        method: str,
        *,
        deadline: float,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One request of a Green-API method (a POST when it has a ``body``); its 200
        answer, else the ApiError (or PayloadError) that says why not."""
        host = _host(instance)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError(
                f"{method} on {host}: time budget exhausted",
                error_kind=ErrorKind.TIMEOUT,
                retryable=False,
            )
        token = instance.token.get_secret_value()
        request = Request(
            base=instance.api_url,
            path=f"/waInstance{instance.id_instance}/{method}/{token}",
            params=params,
            timeout=(
                min(instance.connect_timeout_seconds, remaining),
                min(instance.timeout_seconds, remaining),
            ),
            deadline=deadline,
            method="GET" if body is None else "POST",
            body=body,
        )
        try:
            response = self._transport.send(request)
        except TransportTimeout as exc:
            raise ApiError(
                f"{method} on {host}: timed out ({exc.name})",
                error_kind=ErrorKind.TIMEOUT,
                retryable=True,
            ) from None
        except TransportError as exc:
            raise ApiError(
                f"{method} on {host}: {exc.name}: {short(redact(exc.detail))}",
                error_kind=ErrorKind.CONNECTION,
                retryable=True,
            ) from None
        except BodyTooLarge as exc:
            raise PayloadError(
                f"{method} on {host}: body larger than {exc.limit} bytes",
                http_status=exc.status,
            ) from None
        if response.status == 200:
            return response
        raise _status_error(f"{method} on {host}", response)


def _host(instance: Instance) -> str:
    return urlsplit(instance.api_url).netloc


def _status_error(where: str, response: Response) -> ApiError:
    """The ApiError for an answer other than 200."""
    status, body = response.status, response.body
    ambiguous = False
    if status == 400:
        text = body[:4096].decode("utf-8", "replace")
        kind = classify_400(text)
        ambiguous = is_ambiguous_400(text)
        retryable = kind.info.retried
    else:
        kind, retryable = _status_kind(status)
    exc = ApiError(
        f"{where}: HTTP {status}: {detail(status, body)}",
        error_kind=kind,
        http_status=status,
        retryable=retryable,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )
    exc.ambiguous = ambiguous
    return exc

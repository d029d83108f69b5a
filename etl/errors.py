"""One exception tree for the whole package.

    EtlError
    ├── ConfigError          bad configuration; stops start-up
    ├── DatabaseNotReady     schema missing or not at the latest revision
    └── SyncError            one instance's sync failed; carries ``error_kind``
        ├── ApiError         Green-API answered with an error status, or could not be reached
        └── PayloadError     the body is not a JSON array of chats

No message in this tree ever contains an API token: the client builds every
message itself from redacted parts instead of passing through library text.

``ErrorKind`` names every value of ``sync_runs.error_kind``; ``ERROR_KINDS`` says what each
one means (its status, cause, whether it is retried within the tick, when it backs off).
The client, the sync, the status page and docs/errors.md all read that one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Backoff(StrEnum):
    """When a run of failures of one kind makes the daemon poll an instance less often."""

    FIRST = "from the first failure"
    AFTER_N = "after backoff_after_transient_failures in a row"
    NEVER = "never"
    NOT_A_FAILURE = "—"


@dataclass(frozen=True, slots=True)
class KindInfo:
    """What one ``error_kind`` means: the table in docs/errors.md is this, row by row."""

    #: the ``sync_runs.status`` a tick of this kind records
    status: str
    #: what causes it
    cause: str
    #: whether the client tries again within the same tick
    retried: bool
    backoff: Backoff


class ErrorKind(StrEnum):
    """The ``sync_runs.error_kind`` values. Their meaning is ``ERROR_KINDS[kind]``."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    NOT_AUTHORIZED = "not_authorized"
    STARTING = "starting"
    EXPIRED = "expired"
    BAD_REQUEST = "bad_request"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    BAD_PAYLOAD = "bad_payload"
    DATABASE = "database"
    EMPTY_RESPONSE = "empty_response"
    MASS_REMOVAL = "mass_removal"

    @property
    def info(self) -> KindInfo:
        return ERROR_KINDS[self]


_F, _A = "failed", "anomaly"
#: one row per kind; docs/errors.md prints this table and a test keeps the two in step
ERROR_KINDS: dict[ErrorKind, KindInfo] = {
    ErrorKind.UNAUTHORIZED: KindInfo(
        _F, "HTTP 401: a wrong apiTokenInstance", False, Backoff.FIRST
    ),
    ErrorKind.FORBIDDEN: KindInfo(_F, "HTTP 403: a wrong idInstance or URL", False, Backoff.FIRST),
    ErrorKind.NOT_FOUND: KindInfo(_F, "HTTP 404: a wrong method or path", False, Backoff.FIRST),
    ErrorKind.NOT_AUTHORIZED: KindInfo(
        _F, "HTTP 400 `…not authorized`: the phone is not linked", False, Backoff.FIRST
    ),
    ErrorKind.STARTING: KindInfo(
        _F, "HTTP 400 `…starting process…`: the instance is (re)starting", False, Backoff.AFTER_N
    ),
    ErrorKind.EXPIRED: KindInfo(
        _F,
        "HTTP 400 `…expired` or `…deleted`: billing, or the instance is gone",
        False,
        Backoff.FIRST,
    ),
    ErrorKind.BAD_REQUEST: KindInfo(
        _F, "any other HTTP 400, or another 4xx status", False, Backoff.FIRST
    ),
    ErrorKind.RATE_LIMITED: KindInfo(
        _F, "HTTP 429 (a `Retry-After` header is honoured)", True, Backoff.AFTER_N
    ),
    ErrorKind.QUOTA_EXCEEDED: KindInfo(
        _F,
        "HTTP 466: the plan's quota (the body's statuses go into `error`)",
        False,
        Backoff.FIRST,
    ),
    ErrorKind.SERVER_ERROR: KindInfo(
        _F,
        "HTTP 499, 500, 502, 503, 504 (retried); any other 5xx (not retried)",
        True,
        Backoff.AFTER_N,
    ),
    ErrorKind.TIMEOUT: KindInfo(
        _F, "no answer within the timeouts or the tick's budget", True, Backoff.AFTER_N
    ),
    ErrorKind.CONNECTION: KindInfo(_F, "the API could not be reached", True, Backoff.AFTER_N),
    ErrorKind.BAD_PAYLOAD: KindInfo(
        _F, "a 200 whose body is not a JSON array (or is too large)", False, Backoff.AFTER_N
    ),
    ErrorKind.DATABASE: KindInfo(
        _F,
        "the write transaction failed (written to `sync_runs` once the database answers)",
        False,
        Backoff.NEVER,
    ),
    ErrorKind.EMPTY_RESPONSE: KindInfo(
        _A, "getChats answered `[]`; nothing applied", False, Backoff.NOT_A_FAILURE
    ),
    ErrorKind.MASS_REMOVAL: KindInfo(
        _A,
        "too many known chats vanished at once; held until confirmed",
        False,
        Backoff.NOT_A_FAILURE,
    ),
}


class EtlError(Exception):
    """Root of every error raised on purpose by this package."""


class ConfigError(EtlError):
    """The configuration is invalid. The message names the instance and the key."""


class DatabaseNotReady(EtlError):
    """The database schema is missing or behind the latest Alembic revision."""


class SyncError(EtlError):
    """A sync of one instance failed; ``error_kind`` is the value stored in ``sync_runs``."""

    def __init__(
        self,
        message: str,
        *,
        error_kind: ErrorKind,
        http_status: int | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.error_kind = error_kind
        self.http_status = http_status
        self.attempts = attempts

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ApiError(SyncError):
    """Green-API answered with an error, timed out, or was unreachable."""

    def __init__(
        self,
        message: str,
        *,
        error_kind: ErrorKind,
        http_status: int | None = None,
        attempts: int = 0,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, error_kind=error_kind, http_status=http_status, attempts=attempts)
        self.retryable = retryable
        self.retry_after = retry_after


class PayloadError(SyncError):
    """The response body cannot be used at all (not JSON, not an array)."""

    def __init__(self, message: str, *, http_status: int | None = 200, attempts: int = 0) -> None:
        super().__init__(
            message, error_kind=ErrorKind.BAD_PAYLOAD, http_status=http_status, attempts=attempts
        )


def error_kind(value: str | None) -> ErrorKind | None:
    """The kind named by a stored ``error_kind`` (None for NULL or a value of no kind)."""
    return ErrorKind._value2member_map_.get(value) if value is not None else None  # type: ignore[return-value]

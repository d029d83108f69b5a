"""One exception tree for the whole package.

    EtlError
    ├── ConfigError          bad configuration; stops start-up
    ├── DatabaseNotReady     schema missing or not at the latest revision
    └── SyncError            one instance's sync failed; carries ``error_kind``
        ├── ApiError         Green-API answered with an error status, or could not be reached
        └── PayloadError     the body is not a JSON array of chats
            └── PlatformMismatch  it is, of another messenger than the instance's

No message in this tree ever contains an API token: the client builds every
message itself from redacted parts instead of passing through library text.

``ErrorKind`` names every value of ``sync_runs.error_kind``; ``ERROR_KINDS`` says what each
one means (its status, cause, whether it is retried within the tick, when it backs off,
what the operator should do). The client, the sync, the status page, ``etl status`` and
docs/errors.md all read that one table.
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
    #: what the operator should do about it
    action: str


class ErrorKind(StrEnum):
    """The ``sync_runs.error_kind`` values. Their meaning is ``ERROR_KINDS[kind]``."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    NOT_AUTHORIZED = "not_authorized"
    STARTING = "starting"
    BLOCKED = "blocked"
    SLEEP_MODE = "sleep_mode"
    YELLOW_CARD = "yellow_card"
    EXPIRED = "expired"
    BAD_REQUEST = "bad_request"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    BAD_PAYLOAD = "bad_payload"
    WRONG_PLATFORM = "wrong_platform"
    DATABASE = "database"
    LEASE_LOST = "lease_lost"
    EMPTY_RESPONSE = "empty_response"
    MASS_REMOVAL = "mass_removal"
    ID_SWITCH = "id_switch"

    @property
    def info(self) -> KindInfo:
        return ERROR_KINDS[self]


_F, _A = "failed", "anomaly"
_FIRST, _AFTER_N, _NONE = Backoff.FIRST, Backoff.AFTER_N, Backoff.NOT_A_FAILURE
#: one row per kind; docs/errors.md prints this table and a test keeps the two in step
ERROR_KINDS: dict[ErrorKind, KindInfo] = {
    ErrorKind.UNAUTHORIZED: KindInfo(
        _F,
        "HTTP 401: a wrong apiTokenInstance",
        False,
        _FIRST,
        "check the token in the Green-API console against the instance's token source",
    ),
    ErrorKind.FORBIDDEN: KindInfo(
        _F,
        "HTTP 403: a wrong idInstance or URL; or, as the error says, a proxy's page or a "
        "suspended account",
        False,
        _FIRST,
        "check id_instance and api_url in the console; for a proxy's page, the network; "
        "for a suspended account, Green-API support",
    ),
    ErrorKind.NOT_FOUND: KindInfo(
        _F,
        "HTTP 404: a wrong method or path",
        False,
        _FIRST,
        "check api_url; if it is right, Green-API changed getChats: report it",
    ),
    ErrorKind.NOT_AUTHORIZED: KindInfo(
        _F,
        "HTTP 400 `…not authorized`, or getStateInstance `notAuthorized`: the phone is not linked",
        False,
        _FIRST,
        "scan the QR code in the Green-API console with the phone",
    ),
    ErrorKind.STARTING: KindInfo(
        _F,
        "HTTP 400 `…starting process…`, or getStateInstance `starting`: the instance is "
        "(re)starting",
        False,
        _AFTER_N,
        "wait: a restart takes up to about 5 minutes; if it lasts, reboot the instance in "
        "the console",
    ),
    ErrorKind.BLOCKED: KindInfo(
        _F,
        "getStateInstance `blocked`: the account is banned",
        False,
        _FIRST,
        "contact Green-API support",
    ),
    ErrorKind.SLEEP_MODE: KindInfo(
        _F,
        "getStateInstance `sleepMode`: the phone is off or offline",
        False,
        _AFTER_N,
        "switch the phone on and connect it; the instance is authorized again within "
        "about 5 minutes",
    ),
    ErrorKind.YELLOW_CARD: KindInfo(
        _F,
        "getStateInstance `yellowCard` (Telegram: `suspended`): sending is suspended for spam",
        False,
        _FIRST,
        "follow Green-API's yellowCard article, then reboot the instance",
    ),
    ErrorKind.EXPIRED: KindInfo(
        _F,
        "HTTP 400 `…expired` or `…deleted`: billing, or the instance is gone",
        False,
        _FIRST,
        "renew the plan, or remove the instance from the config",
    ),
    ErrorKind.BAD_REQUEST: KindInfo(
        _F,
        "any other HTTP 400, or another 4xx status",
        False,
        _FIRST,
        "report it with the error text: chatsync's request or Green-API's API changed",
    ),
    ErrorKind.RATE_LIMITED: KindInfo(
        _F,
        "HTTP 429 (a `Retry-After` header is honoured)",
        True,
        _AFTER_N,
        "nothing if rare; if it lasts, another client polls the same instance",
    ),
    ErrorKind.QUOTA_EXCEEDED: KindInfo(
        _F,
        "HTTP 466: the plan's quota (the method, counts and statuses go into `error`)",
        False,
        _FIRST,
        "wait for the monthly reset, or move the instance to a paid plan",
    ),
    ErrorKind.SERVER_ERROR: KindInfo(
        _F,
        "HTTP 499, 500, 502, 503, 504 (retried); any other 5xx (not retried)",
        True,
        _AFTER_N,
        "nothing: it is retried; if it lasts, check Green-API's status",
    ),
    ErrorKind.TIMEOUT: KindInfo(
        _F,
        "no answer within the timeouts or the tick's budget",
        True,
        _AFTER_N,
        "if it lasts, the answer takes longer than the budget: raise timeout_seconds and "
        "interval_seconds",
    ),
    ErrorKind.CONNECTION: KindInfo(
        _F,
        "the API could not be reached",
        True,
        _AFTER_N,
        "check the network, DNS, proxy settings and api_url",
    ),
    ErrorKind.BAD_PAYLOAD: KindInfo(
        _F,
        "a 200 whose body is not a JSON array (or is too large)",
        False,
        _AFTER_N,
        "check api_url (a proxy or captive portal answers HTML); otherwise report it",
    ),
    ErrorKind.WRONG_PLATFORM: KindInfo(
        _F,
        "the list is another messenger's (Telegram, MAX or WhatsApp) than the instance's "
        "`platform`",
        False,
        _FIRST,
        "set platform in the instance's config to the messenger the error names",
    ),
    ErrorKind.DATABASE: KindInfo(
        _F,
        "the write transaction failed (written to `sync_runs` once the database answers)",
        False,
        Backoff.NEVER,
        "check the database; the failed ticks are written once it answers",
    ),
    ErrorKind.LEASE_LOST: KindInfo(
        _F,
        "several replicas: this replica's claim on the instance was no longer held when it "
        "wrote (it stalled, and another replica took the instance over); nothing applied",
        False,
        Backoff.NEVER,
        "nothing: the new owner syncs the instance; if it recurs, look for what stalls the "
        "replica (CPU, memory, a paused VM) or lengthen `lease_seconds`",
    ),
    ErrorKind.EMPTY_RESPONSE: KindInfo(
        _A,
        "getChats answered `[]`; nothing applied",
        False,
        _NONE,
        "if it lasts, contact Green-API support (their docs say so)",
    ),
    ErrorKind.MASS_REMOVAL: KindInfo(
        _A,
        "too many known chats vanished at once; held until confirmed",
        False,
        _NONE,
        "nothing: a real removal is applied once confirmed",
    ),
    ErrorKind.ID_SWITCH: KindInfo(
        _A,
        "the ids of many chats changed (`@c.us` and `@lid`) and not every old id could be "
        "linked to its new one; held",
        False,
        _NONE,
        "link the ids with `etl ids link`, or accept the switch with `etl ids accept`",
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
        instance_state: str | None = None,
    ) -> None:
        super().__init__(message, error_kind=error_kind, http_status=http_status, attempts=attempts)
        self.retryable = retryable
        self.retry_after = retry_after
        #: the getStateInstance answer behind an ambiguous error, when it was asked
        self.instance_state = instance_state
        #: an answer whose kind only the instance's state tells (the client asks it)
        self.ambiguous = False


class PayloadError(SyncError):
    """The response body cannot be used at all (not JSON, not an array)."""

    def __init__(self, message: str, *, http_status: int | None = 200, attempts: int = 0) -> None:
        super().__init__(
            message, error_kind=ErrorKind.BAD_PAYLOAD, http_status=http_status, attempts=attempts
        )


#: how each ``platform`` value is named in messages
PLATFORM_LABELS = {"whatsapp": "WhatsApp", "telegram": "Telegram", "max": "MAX"}


class PlatformMismatch(PayloadError):
    """getChats answered with another messenger's chats than the instance's ``platform``."""

    def __init__(self, platform: str, looks: str, received: int) -> None:
        super().__init__(
            f"the {received} elements look like a {PLATFORM_LABELS.get(looks, looks)} chat "
            f"list, but the instance's platform is {platform!r}; set platform = {looks!r} in "
            "its config; nothing applied"
        )
        self.error_kind = ErrorKind.WRONG_PLATFORM
        self.platform = platform
        self.looks = looks


def error_kind(value: str | None) -> ErrorKind | None:
    """The kind named by a stored ``error_kind`` (None for NULL or a value of no kind)."""
    return ErrorKind._value2member_map_.get(value) if value is not None else None  # type: ignore[return-value]

"""One exception tree for the whole package.

    EtlError
    ├── ConfigError          bad configuration; stops start-up
    ├── DatabaseNotReady     schema missing or not at the latest revision
    └── SyncError            one instance's sync failed; carries ``error_kind``
        ├── ApiError         Green-API answered with an error status, or could not be reached
        └── PayloadError     the body is not a JSON array of chats

No message in this tree ever contains an API token: the client builds every
message itself from redacted parts instead of passing through library text.
"""

from __future__ import annotations


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
        error_kind: str,
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
        error_kind: str,
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
            message, error_kind="bad_payload", http_status=http_status, attempts=attempts
        )

"""Secret redaction: the second line of defence behind code that never formats a token.

Tokens are registered once when the configuration is loaded. ``redact()`` replaces
every registered secret in a string; ``RedactingFilter`` does the same for log
records and is attached to our loggers *and* to urllib3's, whose DEBUG lines
print request paths (where Green-API puts the token).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

from sqlalchemy.engine import make_url

MASK = "***"
_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
#: the shortest secret, and whether any secret holds whitespace: a text whose longest run
#: of non-whitespace is shorter than the shortest secret cannot contain one. With a token
#: per instance, the plain loop (one substring search per secret) grows with the fleet
#: on every log line; the check is one split of the line.
_shortest = 0
_spaced = False
#: any whitespace, as ``str.split()`` splits on it: searched by the regular expression
#: engine, not by a Python loop over every character of every token of a fleet
_WHITESPACE = re.compile(r"\s")
# Green-API's path shape: /waInstance<id>/<method>/<token>. Masks unregistered tokens too.
_PATH_TOKEN = re.compile(r"(/waInstance\d+/[A-Za-z]+/)[^/?#\s'\"]+")


def register_secret(secret: str) -> None:
    """Remember a secret so that every later ``redact()`` call masks it."""
    register_secrets((secret,))


def register_secrets(secrets: Iterable[str]) -> None:
    """Remember many secrets at once (a config's tokens). ``redact()`` reads the set
    without the lock, so the set is replaced, never changed in place: registering a
    fleet's tokens one by one would copy it once per token, a time that grows with the
    square of the fleet's size."""
    global _secrets, _shortest, _spaced
    with _lock:
        new = {s for s in secrets if s} - _secrets
        if not new:
            return
        # only the new secrets are looked at (recomputing over all of them would scan
        # every token again at each registration)
        shortest = min(map(len, new))
        _shortest = min(_shortest, shortest) if _secrets else shortest
        _spaced = _spaced or any(map(_WHITESPACE.search, new))
        _secrets = _secrets | new


def redact(text: str) -> str:
    """Mask registered secrets and anything in the token position of a Green-API path."""
    secrets = _secrets
    if secrets and (_spaced or max(map(len, text.split()), default=0) >= _shortest):
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
    return _PATH_TOKEN.sub(rf"\g<1>{MASK}", text)


def redact_url(url: str) -> str:
    """A database URL with its password masked, safe to print."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a parseable URL: mask what looks like user:password@
        return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with secrets masked. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # attached to our loggers and to the root's handlers: mask each record once
        if getattr(record, "_redacted", False):
            return True
        record._redacted = True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw text, masked
            message = str(record.msg)
        clean = redact(message)
        if clean != message or record.args:
            record.msg = clean
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Format the traceback now, masked, so no handler formats the raw one.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_FILTER = RedactingFilter()
_PROTECTED_LOGGERS = (
    "etl",
    "urllib3",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.util.retry",
    "requests",
    "apscheduler",
    "apscheduler.executors.default",
)


def install_log_redaction() -> None:
    """Attach the redacting filter to the loggers that may see a URL. Idempotent."""
    for name in _PROTECTED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    root = logging.getLogger()
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)

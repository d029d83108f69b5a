"""Reading Green-API's error answers: what a 400 text, a 403 body, a 466 body and an HTML
page say, as the short, redacted detail of an error message.

Pure functions over bytes; the client (``etl.client``) decides what to do with them.
Nothing here echoes a body that may hold personal data: a 466 description lists chat ids,
so only its method, counts and statuses are kept.
"""

from __future__ import annotations

import html
import re
from typing import Any

import orjson

from etl.errors import ErrorKind
from etl.redact import redact

#: getStateInstance's states (WhatsApp, and Telegram's own) and the kind each one means
STATE_KINDS: dict[str, ErrorKind] = {
    "starting": ErrorKind.STARTING,
    # it answered "starting or not authorized" a moment ago and is authorized now: it was
    # finishing a start
    "authorized": ErrorKind.STARTING,
    "notAuthorized": ErrorKind.NOT_AUTHORIZED,
    "pendingPassword": ErrorKind.NOT_AUTHORIZED,  # Telegram: the 2FA password is awaited
    "blocked": ErrorKind.BLOCKED,
    "sleepMode": ErrorKind.SLEEP_MODE,
    "yellowCard": ErrorKind.YELLOW_CARD,
    "suspended": ErrorKind.YELLOW_CARD,  # Telegram: temporary restrictions on sending
}

_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_SUSPENDED = ("suspend", "blocked", "banned", "ban ")


def short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def is_ambiguous_400(text: str) -> bool:
    """``instance is starting or not authorized``: one text for a restart and an unlinked
    phone, that only getStateInstance tells apart."""
    low = text.lower()
    return "starting" in low and "not authorized" in low and "starting process" not in low


def is_html(body: bytes) -> bool:
    head = body.lstrip()[:512].lower()
    return head.startswith(b"<") and (b"<html" in head or b"<!doctype" in head or b"<h" in head)


def html_title(body: bytes) -> str:
    """The page's title (or first heading), as text; ``""`` when it has none."""
    found = _TITLE.search(body[:65536]) or re.search(
        rb"<h1[^>]*>(.*?)</h1>", body[:65536], re.IGNORECASE | re.DOTALL
    )
    if found is None:
        return ""
    raw = found.group(1).decode("utf-8", "replace")
    return short(html.unescape(re.sub(r"<[^>]+>", " ", raw)), 80)


def _text(body: bytes) -> str:
    return body[:4096].decode("utf-8", "replace")


def detail(status: int, body: bytes) -> str:
    """The redacted detail of an error answer, for its message."""
    if status == 466:
        return quota_detail(body)
    if status == 403:
        return forbidden_detail(body)
    if is_html(body):
        title = html_title(body)
        return short(redact(f"an HTML page{f' ({title!r})' if title else ''}"), 200)
    return short(redact(_text(body)), 200)


def forbidden_detail(body: bytes) -> str:
    """What a 403 is: a wrong idInstance (Green-API's own plain answer) unless the body
    says otherwise: an HTML page (a proxy or web server answered, not the API) or a
    suspended account."""
    if is_html(body):
        title = html_title(body)
        page = f"an HTML page{f' ({title!r})' if title else ''}"
        return short(
            redact(
                f"{page}, from a proxy or web server, not Green-API's API: check api_url "
                "and any proxy in between"
            ),
            240,
        )
    text = _text(body)
    if any(word in text.lower() for word in _SUSPENDED):
        return short(redact(f"the account looks suspended: {text}"), 240)
    return short(redact(f"{text.strip() or 'Forbidden'}: a wrong idInstance or api_url"), 200)


def _status_part(name: str, value: Any) -> str | None:
    """``name: method=… used=… total=… status=…`` of one 466 status object."""
    if not isinstance(value, dict):
        return None
    fields = [
        f"{key}={value[key]}"
        for key in ("method", "used", "total", "status")
        if isinstance(value.get(key), str | int) and not isinstance(value.get(key), bool)
    ]
    return f"{name}: {' '.join(fields)}" if fields else None


def quota_detail(body: bytes) -> str:
    """A 466 body as Green-API documents it (``invokeStatus`` and ``correspondentsStatus``
    objects, each with ``method``, ``used``, ``total``, ``status`` and ``description``; or
    one such object alone): the method, counts and statuses, never the description (it
    lists chat ids)."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    parts: list[str] = []
    if isinstance(data, dict):
        for key in ("invokeStatus", "correspondentsStatus"):
            part = _status_part(key, data.get(key))
            if part:
                parts.append(part)
        if not parts:
            part = _status_part("quota", data)
            if part:
                parts.append(part)
    if not parts:
        return "quota exceeded (the body was not the documented JSON)"
    # the values are the server's text: mask them like any other
    return short(redact("; ".join(parts)), 300)

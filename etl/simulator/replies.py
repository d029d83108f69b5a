"""Answers as the server writes them, and the bodies a real deployment gives for errors.

The error bodies are shaped like those Green-API and the nginx in front of it send, so that the
client's handling of each can be tested against the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from etl.simulator.encoding import dumps

JSON: Final = "application/json"
TEXT: Final = "text/plain; charset=utf-8"
HTML: Final = "text/html; charset=utf-8"


@dataclass
class Reply:
    """One answer: what to send, and how (``mode``, see :mod:`etl.simulator.server`)."""

    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    mode: str = "normal"  # normal | reset | truncate
    #: For the request log: the number of chats in a JSON-array answer (None for others).
    served: int | None = None
    #: The request's entry in the log, once recorded (passed to ``GreenApi.answered`` hooks).
    logged: object | None = None


def reason(status: int) -> str:
    """The reason phrase for a status, including the non-standard ones Green-API uses."""
    special = {466: "Quota Exceeded", 499: "Client Closed Request"}
    if status in special:
        return special[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def default_body(status: int) -> tuple[bytes, str]:
    """Default (body, content type) for an error status without an explicit body."""
    if status == 400:
        return b"bad request data", TEXT
    if status == 466:
        return quota_body("getchats", 100, 100), JSON
    return reason(status).encode(), TEXT


def quota_body(method: str, used: int, total: int) -> bytes:
    """A 466 body as Green-API's "466 error example body" page shows it: the method's
    quota, and the correspondents' (chats) quota, whose description lists chat ids."""
    return dumps(
        {
            "invokeStatus": {
                "method": method,
                "used": used,
                "total": total,
                "status": "QUOTE_EXCEEDED",
                "description": "Monthly quota has been exceeded. Please go to your personal "
                "account and change the tariff to business https://console.green-api.com",
            },
            "correspondentsStatus": {
                "method": "correspondents",
                "used": 3,
                "total": 3,
                "status": "CORRESPONDENTS_QUOTE_EXCEEDED",
                "description": "Monthly quota has been exceeded. You can only send or receive "
                "messages in chats 79001234567@c.us, 79001234568@c.us, 120363043968066561@g.us",
            },
        }
    )


def sniff_content_type(body: bytes) -> str:
    """A content type that fits a body given without one."""
    head = body.lstrip()[:1]
    if head in (b"[", b"{"):
        return JSON
    if head == b"<":
        return HTML
    return TEXT


def html_page(status: int) -> bytes:
    """An nginx-style HTML page: a captive-portal login page for 200, else an error page."""
    if status == 200:
        title, text = "Login required", "Please sign in to continue to the network."
    else:
        title = text = f"{status} {reason(status)}"
    return (
        f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>"
        f"<body><center><h1>{text}</h1></center><hr><center>nginx</center></body></html>\n"
    ).encode()

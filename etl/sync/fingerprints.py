"""The stored attributes a tick compares, as one number per chat (``Snapshot``), and the
test that a chat under a new id looks exactly like a stored one (``identity``).

The numbers are stable across processes (xxHash of a fixed encoding, not Python's
``hash``, which is salted per process): a snapshot persisted by one process is read by
another (``etl.sync.snapshot``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from etl.hashing import stable_hash
from etl.payload import ChatRecord


def fingerprint(
    chat_type: str, name: str, archived: bool, expiration: int, setting_at: datetime | None
) -> int:
    """The stored attributes a tick compares, as one number."""
    stamp = "" if setting_at is None else repr(setting_at.timestamp())
    text = f"{chat_type}\x00{name}\x00{int(bool(archived))}\x00{expiration}\x00{stamp}"
    return stable_hash(text.encode("utf-8", "surrogatepass"))


def chat_fingerprint(chat: ChatRecord) -> int:
    return fingerprint(
        chat.chat_type,
        chat.name,
        chat.archived,
        chat.ephemeral_expiration or 0,
        chat.ephemeral_setting_at,
    )


def row_fingerprint(values: dict[str, Any]) -> int:
    """The fingerprint of a ``chats`` row as a tick writes it."""
    return fingerprint(
        values["chat_type"],
        values["name"],
        values["archived"],
        values["ephemeral_expiration"],
        values["ephemeral_setting_at"],
    )

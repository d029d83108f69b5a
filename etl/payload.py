"""Decode, validate and normalise one getChats response.

A body that is not a JSON array fails the whole sync (``PayloadError``). Inside
the array each element is judged on its own: a bad element is rejected with a
reason and the rest are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from etl.errors import PayloadError

#: Largest accepted ephemeralSettingTimestamp (9999-12-31); anything above is a bad value.
MAX_TIMESTAMP = 253_402_300_799
MAX_TEXT = 100_000


# not frozen: a frozen dataclass's __init__ sets every field through object.__setattr__,
# and one record is built per chat at every decode
@dataclass(slots=True)
class ChatRecord:
    """One normalised chat. ``None`` ephemeral fields mean "the API did not say"."""

    chat_id: str
    chat_type: str
    name: str
    archived: bool
    ephemeral_expiration: int | None
    ephemeral_setting_at: datetime | None
    ephemeral_known: bool


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    reason: str
    chat_id: str | None = None  # the normalised id when it could be read


@dataclass(frozen=True, slots=True)
class DecodedChats:
    chats: list[ChatRecord]
    rejected: list[Rejected]
    received: int
    #: ids of elements skipped as identical to ``known`` (valid, not duplicates); their
    #: records are not in ``chats``
    unchanged: list[str] = field(default_factory=list)
    #: chat id per hash of the raw bytes of every accepted element (the ``known`` of the
    #: next decode); None unless asked for, empty when the body could not be split
    raw_hashes: dict[int, str] | None = None

    @property
    def ids(self) -> set[str]:
        """Every accepted chat id, decoded or skipped as unchanged."""
        out = {c.chat_id for c in self.chats}
        out.update(self.unchanged)
        return out


class _Bad(Exception):
    pass


def _clean_text(value: str) -> str:
    value = value.replace("\x00", "")
    return value[:MAX_TEXT]


def normalise_chat_id(raw: object) -> str:
    """Opaque id as text; a bare digit id becomes ``<digits>@c.us``."""
    if isinstance(raw, bool):
        raise _Bad("id is a boolean")
    if isinstance(raw, int):
        if raw <= 0:
            raise _Bad("id is not a positive number")
        return f"{raw}@c.us"
    if not isinstance(raw, str):
        raise _Bad(f"id has type {type(raw).__name__}")
    value = _clean_text(raw).strip()
    if not value:
        raise _Bad("id is empty")
    if value.isascii() and value.isdigit():
        return f"{value}@c.us"
    return value


def _opt(item: dict[str, Any], key: str) -> Any:
    return item.get(key)


def _chat_type(item: dict[str, Any], chat_id: str) -> str:
    value = _opt(item, "type")
    if value is None:
        return "group" if chat_id.endswith("@g.us") else "user"
    if not isinstance(value, str):
        raise _Bad(f"type has type {type(value).__name__}")
    return _clean_text(value)


def _int_field(item: dict[str, Any], key: str) -> int | None:
    value = _opt(item, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{key} has type {type(value).__name__}")
    if value < 0:
        raise _Bad(f"{key} is negative")
    return value


def decode_chat(item: object) -> ChatRecord:
    """Validate and normalise one element; raises ``_Bad`` with the reason."""
    if not isinstance(item, dict):
        raise _Bad(f"element is a {type(item).__name__}, not an object")
    chat_id = normalise_chat_id(item.get("id"))
    name = _opt(item, "name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        raise _Bad(f"name has type {type(name).__name__}")
    archived = _opt(item, "archive")
    if archived is None:
        archived = False
    elif not isinstance(archived, bool):
        raise _Bad(f"archive has type {type(archived).__name__}")
    expiration = _int_field(item, "ephemeralExpiration")
    if expiration is not None and expiration > 2**31 - 1:
        raise _Bad("ephemeralExpiration out of range")
    stamp = _int_field(item, "ephemeralSettingTimestamp")
    if stamp is not None and stamp > MAX_TIMESTAMP:
        raise _Bad("ephemeralSettingTimestamp out of range")
    setting_at = datetime.fromtimestamp(stamp, UTC) if stamp else None
    known = expiration is not None
    return ChatRecord(
        chat_id=chat_id,
        chat_type=_chat_type(item, chat_id),
        name=_clean_text(name),
        archived=archived,
        ephemeral_expiration=expiration if known else None,
        ephemeral_setting_at=setting_at if known else None,
        ephemeral_known=known,
    )


def _readable_id(item: object) -> str | None:
    if not isinstance(item, dict):
        return None
    try:
        return normalise_chat_id(item.get("id"))
    except _Bad:
        return None


#: JSON whitespace, a comma between two objects, more whitespace: where a flat array of
#: objects splits into its elements (a match inside a string is caught, see ``_elements``)
_BETWEEN = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_JSON_SPACE = b" \t\r\n"


def _elements(body: bytes) -> list[bytes] | None:
    """The elements of a JSON array of objects, each without its braces, split at ``},{``
    without parsing; None when the body does not look like one. A split inside a string
    value leaves a piece that is not a JSON object by itself, which ``_decode_pieces``
    detects (the whole body is then decoded as usual)."""
    text = body.strip(_JSON_SPACE)
    if text[:1] != b"[" or text[-1:] != b"]":
        return None
    inner = text[1:-1].strip(_JSON_SPACE)
    if len(inner) < 2 or inner[:1] != b"{" or inner[-1:] != b"}":
        return None
    return _BETWEEN.split(inner[1:-1])


def decode_chats(
    body: bytes | str, *, known: Mapping[int, str] | None = None, track: bool = False
) -> DecodedChats:
    """Decode a getChats body. Raises PayloadError when it is not a JSON array.

    ``track``: also return ``raw_hashes``, a hash of each accepted element's raw bytes
    mapped to its chat id. ``known``: the ``raw_hashes`` of the last list applied; an
    element byte-identical to one there decodes to the same record as then, so it is not
    parsed at all, only listed in ``unchanged`` (between two polls most chats do not
    change, so most elements of a steady fleet's bodies need no parsing).
    """
    if (track or known is not None) and isinstance(body, bytes):
        pieces = _elements(body)
        if pieces is not None:
            decoded = _decode_pieces(pieces, known or {})
            if decoded is not None:
                return decoded
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"body is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(data, list):
        raise PayloadError(f"body is a JSON {type(data).__name__}, not an array")
    chats: list[ChatRecord] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        _accept(index, item, chats, rejected, seen)
    return DecodedChats(
        chats=chats,
        rejected=rejected,
        received=len(data),
        raw_hashes={} if (track or known is not None) else None,
    )


def _accept(
    index: int, item: object, chats: list[ChatRecord], rejected: list[Rejected], seen: set[str]
) -> str | None:
    """Validate one element into ``chats`` or ``rejected`` (a duplicate id: the first wins);
    returns its chat id when accepted."""
    try:
        chat = decode_chat(item)
    except _Bad as exc:
        rejected.append(Rejected(index, str(exc), _readable_id(item)))
        return None
    if chat.chat_id in seen:
        rejected.append(Rejected(index, f"duplicate id {chat.chat_id!r}", chat.chat_id))
        return None
    seen.add(chat.chat_id)
    chats.append(chat)
    return chat.chat_id


def _decode_pieces(pieces: list[bytes], known: Mapping[int, str]) -> DecodedChats | None:
    """``decode_chats`` over the raw elements; None when one is not a JSON object on its
    own (the split went through a string). The pieces joined back are the body, so when
    every piece is an object the body is a valid array of exactly these elements."""
    chats: list[ChatRecord] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    unchanged: list[str] = []
    hashes: dict[int, str] = {}
    for index, piece in enumerate(pieces):
        # a 64-bit hash of the bytes: a changed element taken for the unchanged one it
        # collides with is a ~1e-19 chance per pair compared
        h = hash(piece)
        chat_id = known.get(h)
        if chat_id is not None and chat_id not in seen:
            seen.add(chat_id)
            unchanged.append(chat_id)
            hashes[h] = chat_id
            continue
        try:
            item = orjson.loads(b"{" + piece + b"}")
        except orjson.JSONDecodeError:
            return None
        chat_id = _accept(index, item, chats, rejected, seen)
        if chat_id is not None:
            hashes[h] = chat_id
    return DecodedChats(
        chats=chats,
        rejected=rejected,
        received=len(pieces),
        unchanged=unchanged,
        raw_hashes=hashes,
    )

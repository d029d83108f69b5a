"""Decode, validate and normalise one getChats response.

A body that is not a JSON array fails the whole sync (``PayloadError``), and so does an
array of another messenger's chats (``PlatformMismatch``: Green-API serves WhatsApp,
Telegram and MAX instances on the same path, with different elements). Inside the array
each element is judged on its own: an element that is not an object, or whose id cannot be
read or is obviously not a chat's, is rejected with a reason and the rest are kept.

Tolerant where the real API is loose, so that a chat never freezes (kept, never updated)
because one field changed its form: a number sent as a digit string (or as an integral
float) is read as the number, a 13-digit timestamp as milliseconds, ``"true"``/``1`` as a
flag. A field still not understood is treated as missing for that element (the stored
value is kept, as when the API omits the field) and counted in ``DecodedChats.notes``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from etl.errors import PayloadError, PlatformMismatch
from etl.hashing import stable_hash

#: Largest accepted ephemeralSettingTimestamp (9999-12-31); anything above is a bad value.
MAX_TIMESTAMP = 253_402_300_799
#: 13-digit timestamps are milliseconds (10**12 ms is 2001-09-09; in seconds, year 33658)
_MS_FROM, _MS_TO = 10**12, 10**13
MAX_TEXT = 100_000
#: local parts that a broken client serialised instead of an id ("null@c.us")
_NOT_IDS = frozenset({"null", "undefined", "none", "nan", "nil", "[object object]"})
_GROUP_LOCAL = re.compile(r"[0-9]+(?:-[0-9]+)?")


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
    #: False when the element did not say (or said something unreadable): a stored chat
    #: keeps its flag
    archive_known: bool = True


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
    #: fields not understood and ignored (the element was kept), by reason: how many
    notes: dict[str, int] = field(default_factory=dict)
    #: ``stable_hash`` of the whole body when it was tracked and every element was
    #: accepted without a note (so that the same body again decodes to the same list
    #: without being split); 0 otherwise
    body_hash: int = 0

    @property
    def ids(self) -> set[str]:
        """Every accepted chat id, decoded or skipped as unchanged."""
        out = {c.chat_id for c in self.chats}
        out.update(self.unchanged)
        return out


class _Bad(ValueError):
    """An element (or an id) that cannot be used; the message says why."""


def _clean_text(value: str) -> str:
    value = value.replace("\x00", "")
    return value[:MAX_TEXT]


def normalise_chat_id(raw: object) -> str:
    """A WhatsApp id as text; a bare digit id becomes ``<digits>@c.us``. Other ids are
    opaque, except ones that are obviously not a chat's: an empty or ``null`` part before
    the ``@``, or non-digits where WhatsApp puts a number (``@c.us``, ``@lid``, ``@g.us``)."""
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
        value = f"{value}@c.us"
    _check_whatsapp_id(value)
    return value


def _check_whatsapp_id(value: str) -> None:
    local, at, server = value.rpartition("@")
    if not at:
        local = server
    if not local:
        raise _Bad(f"id {value[:40]!r} has nothing before the @")
    if local.lower() in _NOT_IDS:
        raise _Bad(f"id {value[:40]!r} is not a chat id")
    if server in ("c.us", "lid"):
        if not (local.isascii() and local.isdigit()):
            raise _Bad(f"id {value[:40]!r}: a @{server} id is a number")
    elif server == "g.us" and not (local.isascii() and _GROUP_LOCAL.fullmatch(local)):
        raise _Bad(f"id {value[:40]!r}: a @g.us id is a number (or two, joined by -)")


def _platform_id(raw: object) -> str:
    """A Telegram or MAX ``chatId`` as text, exactly as sent (a JSON number as its digits)."""
    if isinstance(raw, bool):
        raise _Bad("chatId is a boolean")
    if isinstance(raw, int):
        return str(raw)
    if not isinstance(raw, str):
        raise _Bad(f"chatId has type {type(raw).__name__}")
    value = _clean_text(raw).strip()
    if not value:
        raise _Bad("chatId is empty")
    if value.lower() in _NOT_IDS:
        raise _Bad(f"chatId {value[:40]!r} is not a chat id")
    return value


def _note(notes: dict[str, int], reason: str) -> None:
    notes[reason] = notes.get(reason, 0) + 1


def _text_field(item: dict[str, Any], key: str, notes: dict[str, int]) -> str:
    """A text field; a number is read as its text, anything else not understood is ''."""
    value = item.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    _note(notes, f"{key} has type {type(value).__name__}")
    return ""


def _chat_type(item: dict[str, Any], default: str, notes: dict[str, int]) -> str:
    value = item.get("type")
    if value is None:
        return default
    if not isinstance(value, str):
        _note(notes, f"type has type {type(value).__name__}")
        return default
    return _clean_text(value) or default


_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _flag(item: dict[str, Any], key: str, notes: dict[str, int]) -> bool | None:
    """A boolean; ``"true"``/``"false"`` and 1/0 too; None when missing or not understood."""
    value = item.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    _note(notes, f"{key} has type {type(value).__name__}")
    return None


class _Unknown(Exception):
    """A numeric field whose value is not understood (the reason is the message)."""


def _number(item: dict[str, Any], key: str) -> int | None:
    """A non-negative integer: a JSON integer, an integral float or a digit string;
    None when missing; raises ``_Unknown`` when not understood."""
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Unknown(f"{key} has type bool")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise _Unknown(f"{key} has type {type(value).__name__}")
    if value < 0:
        raise _Unknown(f"{key} is negative")
    return value


def _stamp(value: int | None) -> datetime | None:
    """``ephemeralSettingTimestamp`` as an instant: seconds, or milliseconds when it has 13
    digits; 0 (never set) is None."""
    if not value:
        return None
    if _MS_FROM <= value < _MS_TO:
        seconds, ms = divmod(value, 1000)
        return datetime.fromtimestamp(seconds, UTC) + timedelta(milliseconds=ms)
    if value > MAX_TIMESTAMP:
        raise _Unknown("ephemeralSettingTimestamp out of range")
    return datetime.fromtimestamp(value, UTC)


def _ephemeral(
    item: dict[str, Any], notes: dict[str, int]
) -> tuple[int | None, datetime | None, bool]:
    """(expiration, setting time, known): unknown when the timer is missing, or when either
    field is not understood (the stored setting is then kept)."""
    try:
        expiration = _number(item, "ephemeralExpiration")
        if expiration is not None and expiration > 2**31 - 1:
            raise _Unknown("ephemeralExpiration out of range")
        setting_at = _stamp(_number(item, "ephemeralSettingTimestamp"))
    except _Unknown as exc:
        _note(notes, str(exc))
        return None, None, False
    if expiration is None:
        return None, None, False
    return expiration, setting_at, True


def decode_chat(item: object, notes: dict[str, int] | None = None) -> ChatRecord:
    """Validate and normalise one WhatsApp element; raises ``_Bad`` with the reason."""
    if not isinstance(item, dict):
        raise _Bad(f"element is a {type(item).__name__}, not an object")
    notes = {} if notes is None else notes
    chat_id = normalise_chat_id(item.get("id"))
    archived = _flag(item, "archive", notes)
    expiration, setting_at, known = _ephemeral(item, notes)
    return ChatRecord(
        chat_id=chat_id,
        chat_type=_chat_type(item, "group" if chat_id.endswith("@g.us") else "user", notes),
        name=_text_field(item, "name", notes),
        archived=bool(archived),
        ephemeral_expiration=expiration,
        ephemeral_setting_at=setting_at,
        ephemeral_known=known,
        archive_known=archived is not None,
    )


#: the marks of a Telegram element that a MAX one does not carry
_TELEGRAM_KEYS = ("name", "type", "username")
#: counted in ``notes`` for each element with a Telegram field; not a problem, a shape
_TELEGRAM_MARK = "(telegram fields)"


def decode_platform_chat(item: object, notes: dict[str, int] | None = None) -> ChatRecord:
    """One Telegram or MAX element: ``chatId`` as sent (negative for groups), ``name`` and
    ``type`` when given (MAX sends neither); no archive flag, no ephemeral setting."""
    if not isinstance(item, dict):
        raise _Bad(f"element is a {type(item).__name__}, not an object")
    notes = {} if notes is None else notes
    chat_id = _platform_id(item.get("chatId"))
    if any(k in item for k in _TELEGRAM_KEYS):
        _note(notes, _TELEGRAM_MARK)
    return ChatRecord(
        chat_id=chat_id,
        chat_type=_chat_type(item, "group" if chat_id.startswith("-") else "user", notes),
        name=_text_field(item, "name", notes),
        archived=False,
        ephemeral_expiration=None,
        ephemeral_setting_at=None,
        ephemeral_known=False,
        archive_known=False,
    )


_Decoder = Callable[[object, dict[str, int]], ChatRecord]
#: bumped whenever an element would decode to another record than before (a new rule, a
#: field read in another form): raw element hashes kept by an older release (a persisted
#: snapshot) then no longer say "decodes as before"
DECODER_VERSION = 1

DECODERS: dict[str, _Decoder] = {
    "whatsapp": decode_chat,
    "telegram": decode_platform_chat,
    "max": decode_platform_chat,
}


def _readable_id(item: object, platform: str = "whatsapp") -> str | None:
    if not isinstance(item, dict):
        return None
    try:
        if platform == "whatsapp":
            return normalise_chat_id(item.get("id"))
        return _platform_id(item.get("chatId"))
    except _Bad:
        return None


def looks_like(items: list[Any]) -> str | None:
    """The messenger whose getChats elements these are, judged by their keys; None when
    they do not say (no objects, or a mix)."""
    objects = [x for x in items[:100] if isinstance(x, dict)]
    if not objects:
        return None
    if all("id" in o and "chatId" not in o for o in objects):
        return "whatsapp"
    if all("chatId" in o and "id" not in o for o in objects):
        telegram = any(k in o for o in objects for k in _TELEGRAM_KEYS)
        return "telegram" if telegram else "max"
    return None


def check_platform(decoded: DecodedChats, platform: str, body: bytes | str) -> None:
    """Raise ``PlatformMismatch`` when the answer is another messenger's chat list: no
    element could be read and their keys are another messenger's, or (Telegram and MAX,
    whose elements share ``chatId``) no decoded element has the fields that tell them
    apart."""
    looks: str | None = None
    if not decoded.chats and not decoded.unchanged and decoded.received:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        looks = looks_like(data) if isinstance(data, list) else None
    elif decoded.chats and platform in ("telegram", "max"):
        marked = decoded.notes.get(_TELEGRAM_MARK, 0)
        if platform == "telegram" and marked == 0:
            looks = "max"
        elif platform == "max" and marked == len(decoded.chats):
            looks = "telegram"
    if looks is not None and looks != platform:
        raise PlatformMismatch(platform, looks, decoded.received)


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
    body: bytes | str,
    *,
    known: Mapping[int, str] | None = None,
    track: bool = False,
    platform: str = "whatsapp",
    known_body: int = 0,
) -> DecodedChats:
    """Decode a getChats body of a ``platform`` instance. Raises PayloadError when it is
    not a JSON array, PlatformMismatch when it is another messenger's list.

    ``track``: also return ``raw_hashes``, a hash of each accepted element's raw bytes
    mapped to its chat id, and ``body_hash``. ``known``: the ``raw_hashes`` of the last
    list applied; an element byte-identical to one there decodes to the same record as
    then, so it is not parsed at all, only listed in ``unchanged`` (between two polls most
    chats do not change, so most elements of a steady fleet's bodies need no parsing).
    ``known_body``: that list's ``body_hash``; the same body again is not even split.
    """
    whole = stable_hash(body) if track and isinstance(body, bytes) else 0
    if whole and whole == known_body and known is not None:
        ids = list(known.values())
        return DecodedChats(
            [], [], len(ids), unchanged=ids, raw_hashes=dict(known), body_hash=whole
        )
    decoded = _decode(body, known, track, platform)
    check_platform(decoded, platform, body)
    if _TELEGRAM_MARK in decoded.notes:
        del decoded.notes[_TELEGRAM_MARK]
    if whole and not decoded.rejected and not decoded.notes and _split_whole(decoded):
        decoded = replace(decoded, body_hash=whole)
    return decoded


def _split_whole(decoded: DecodedChats) -> bool:
    """Whether every chat of ``decoded`` has its element's hash in ``raw_hashes``: the same
    body again may then be answered from them without being split. A body that could not
    be split (a string holding ``},{``, say) was parsed whole and has none: the same body
    again must be parsed again, not taken for an empty list."""
    hashes = decoded.raw_hashes or {}
    return len(hashes) == len(decoded.chats) + len(decoded.unchanged)


def _decode(
    body: bytes | str, known: Mapping[int, str] | None, track: bool, platform: str
) -> DecodedChats:
    decode = DECODERS[platform]
    if (track or known is not None) and isinstance(body, bytes):
        pieces = _elements(body)
        if pieces is not None:
            decoded = _decode_pieces(pieces, known or {}, decode, platform)
            if decoded is not None:
                return decoded
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"body is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(data, list):
        raise PayloadError(f"body is a JSON {type(data).__name__}, not an array")
    out = DecodedChats(
        chats=[],
        rejected=[],
        received=len(data),
        raw_hashes={} if (track or known is not None) else None,
    )
    seen: set[str] = set()
    for index, item in enumerate(data):
        _accept(index, item, out, seen, decode, platform)
    return out


def _accept(
    index: int,
    item: object,
    out: DecodedChats,
    seen: set[str],
    decode: _Decoder,
    platform: str,
) -> str | None:
    """Validate one element into ``out.chats`` or ``out.rejected`` (a duplicate id: the
    first wins); returns its chat id when accepted."""
    chats, rejected = out.chats, out.rejected
    try:
        chat = decode(item, out.notes)
    except _Bad as exc:
        rejected.append(Rejected(index, str(exc), _readable_id(item, platform)))
        return None
    if chat.chat_id in seen:
        rejected.append(Rejected(index, f"duplicate id {chat.chat_id!r}", chat.chat_id))
        return None
    seen.add(chat.chat_id)
    chats.append(chat)
    return chat.chat_id


def _decode_pieces(
    pieces: list[bytes], known: Mapping[int, str], decode: _Decoder, platform: str
) -> DecodedChats | None:
    """``decode_chats`` over the raw elements; None when one is not a JSON object on its
    own (the split went through a string). The pieces joined back are the body, so when
    every piece is an object the body is a valid array of exactly these elements."""
    seen: set[str] = set()
    unchanged: list[str] = []
    hashes: dict[int, str] = {}
    out = DecodedChats(
        chats=[], rejected=[], received=len(pieces), unchanged=unchanged, raw_hashes=hashes
    )
    for index, piece in enumerate(pieces):
        # a 64-bit hash of the bytes: a changed element taken for the unchanged one it
        # collides with is a ~1e-19 chance per pair compared
        h = stable_hash(piece)
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
        chat_id = _accept(index, item, out, seen, decode, platform)
        if chat_id is not None:
            hashes[h] = chat_id
    return out

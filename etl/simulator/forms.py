"""How an instance shows its chats: the same generated chats, in the form its account gives.

* WhatsApp in LID mode: every person chat that was ``…@c.us`` is ``…@lid`` (the person's
  lid, ``lid_of``); groups and chats that were already lids keep their ids. This is what
  Green-API's getChats does when an instance is switched to LID mode.
* Telegram and MAX: elements with ``chatId`` and no ``id``, as their GetChats pages show
  (Telegram: ``chatId``, ``name``, ``type``, ``phoneNumber``, ``username``; MAX:
  ``chatId`` and ``phoneNumber``).

Deterministic: the same chat always gets the same lid or chatId for the same seed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

PLATFORMS: Final = ("whatsapp", "telegram", "max")


def _number(seed: int, text: str, digits: int) -> int:
    """A ``digits``-digit number derived from ``text`` (never starting with 0)."""
    h = hashlib.blake2b(f"chatsync-sim:{seed}:{text}".encode(), digest_size=8).digest()
    low: int = 10 ** (digits - 1)
    return low + int.from_bytes(h, "big") % (9 * low)


def lid_of(phone_id: str, seed: int) -> str:
    """The lid (``<15 digits>@lid``) of the person behind a ``…@c.us`` id."""
    return f"{_number(seed, phone_id, 15)}@lid"


def in_lid_mode(chats: list[Any], seed: int) -> list[Any]:
    """``chats`` as an instance in LID mode lists them: person ``@c.us`` ids become lids."""
    out: list[Any] = []
    for chat in chats:
        cid = chat.get("id") if isinstance(chat, dict) else None
        if isinstance(cid, str) and cid.endswith("@c.us"):
            chat = dict(chat, id=lid_of(cid, seed))
        out.append(chat)
    return out


def _telegram_id(chat_id: str, group: bool, seed: int) -> str:
    if group:
        return f"-100{_number(seed, chat_id, 10)}"
    return str(_number(seed, chat_id, 9))


def as_telegram(chats: list[Any], seed: int) -> list[Any]:
    """The chats as a Telegram instance's getChats elements."""
    out: list[Any] = []
    for chat in chats:
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), str):
            out.append(chat)
            continue
        cid = chat["id"]
        group = chat.get("type") == "group" or cid.endswith("@g.us")
        chat_id = _telegram_id(cid, group, seed)
        phone = int(cid[:-5]) if cid.endswith("@c.us") and cid[:-5].isdigit() else 0
        kind = ("supergroup" if int(chat_id[-1]) % 2 else "group") if group else "user"
        out.append(
            {
                "chatId": chat_id,
                "name": chat.get("name", ""),
                "type": kind,
                "phoneNumber": phone,
                "username": f"@u{chat_id.lstrip('-')}" if int(chat_id[-1]) % 3 else "",
            }
        )
    return out


def as_max(chats: list[Any], seed: int) -> list[Any]:
    """The chats as a MAX instance's getChats elements (``chatId`` and ``phoneNumber``)."""
    return [
        {"chatId": c["chatId"], "phoneNumber": c["phoneNumber"]} if isinstance(c, dict) else c
        for c in as_telegram(chats, seed)
    ]


def view(chats: list[Any], *, platform: str, lid_mode: bool, seed: int) -> list[Any]:
    """The list as served: in the form of the platform, and of LID mode on WhatsApp."""
    if platform == "telegram":
        return as_telegram(chats, seed)
    if platform == "max":
        return as_max(chats, seed)
    return in_lid_mode(chats, seed) if lid_mode else chats

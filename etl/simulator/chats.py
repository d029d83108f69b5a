"""The generated chat lists: plausible WhatsApp chats, and how a list changes at each step.

Every function here draws from an instance's ``random.Random``. Which draws are made, how many
and in what order is what makes a seed reproduce the same lists, so changing any of it changes
what every seed produces, even if the lists look just as plausible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

#: Allowed values of ``ephemeralExpiration`` (seconds; 0 = off).
EPHEMERAL_VALUES: Final = (0, 86400, 604800, 7776000)
#: Per step, the expected fraction of chats that get new activity (move to the front).
_ACTIVITY_RATE: Final = 0.05

_USER_NAMES: Final = (
    "John Doe",
    "Jane Doe",
    "Маша 🌸",
    "Иван Петров",
    "Анна-Мария",
    "Саша (работа)",
    "Папа",
    "Mom ❤️",
    "محمد علي",
    "فاطمة الزهراء",
    "שרה כהן",
    "דוד לוי",
    "Li Wei 李伟",
    "Nguyễn Văn An",
    "Zoë O'Brien",
    "Dr. Smith",
    "Carlos 🇪🇸",
    "Курьер Доставка",
    "Support",
    "Olga",
    "Dmitry K.",
    "👨‍👩‍👧 Family",
    "Ahmed",
    "Priya Sharma",
    "",
    "+7 900 123-45-67",
)
_GROUP_NAMES: Final = (
    "Team 🚀 Alpha",
    "Семья",
    "Project X",
    "Dev chat",
    "Соседи 🏠",
    "משפחה",
    "أصدقاء العمل",
    "Book club 📚",
    "Футбол по средам ⚽",
    "Parents 5B",
    "",
    "Release notes / announcements — " + "очень длинное название группы " * 3,
)
_NAME_SUFFIXES: Final = ("", "", "", " 2", " (work)", " 🔥", " ✨", " ✓")


def _name_variants(pool: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name + suffix if name else "" for name in pool for suffix in _NAME_SUFFIXES)


_USER_VARIANTS: Final = _name_variants(_USER_NAMES)
_GROUP_VARIANTS: Final = _name_variants(_GROUP_NAMES)
_EXPIRATION_PICK: Final = (86400, 604800, 7776000, 604800)


def randround(rng: random.Random, expected: float) -> int:
    """An integer whose expected value is ``expected`` (>= 0)."""
    if expected <= 0:
        return 0
    whole = int(expected)
    return whole + (1 if rng.random() < expected - whole else 0)


def make_chats(rng: random.Random, anchor: int, taken: set[str], n: int) -> list[Any]:
    """``n`` plausible chats with ids not in ``taken`` (they are added to it).

    ~75 % people (``79…@c.us``), ~10 % ``@lid``, ~15 % groups (old and new id styles); ~20 %
    with disappearing messages set before ``anchor``; ~6 % archived. Kept tight for speed.
    """
    out: list[Any] = []
    append = out.append
    getbits = rng.getrandbits
    users, groups = _USER_VARIANTS, _GROUP_VARIANTS
    n_users, n_groups = len(users), len(groups)
    while len(out) < n:
        bits = getbits(32)
        kind = bits & 0xFF
        if kind < 192:
            chat_id = f"79{100_000_000 + getbits(30) % 900_000_000}@c.us"
            chat_type = "user"
            name = users[(bits >> 22) % n_users]
        elif kind < 218:
            chat_id = f"{100_000_000_000_000 + getbits(50) % 900_000_000_000_000}@lid"
            chat_type = "user"
            name = users[(bits >> 22) % n_users]
        elif kind < 237:
            phone = 100_000_000 + getbits(30) % 900_000_000
            chat_id = f"79{phone}-{1_400_000_000 + getbits(28)}@g.us"
            chat_type = "group"
            name = groups[(bits >> 22) % n_groups]
        else:
            chat_id = f"120363{100_000_000_000 + getbits(40) % 900_000_000_000}@g.us"
            chat_type = "group"
            name = groups[(bits >> 22) % n_groups]
        if chat_id in taken:
            continue
        taken.add(chat_id)
        if (bits >> 8) & 0xFF < 51:
            expiration = _EXPIRATION_PICK[(bits >> 16) & 3]
            stamp = anchor - 3600 - getbits(25)  # up to ~13 months before the anchor
        else:
            expiration = stamp = 0
        append(
            {
                "archive": (bits >> 18) & 0xF == 0,
                "id": chat_id,
                "ephemeralExpiration": expiration,
                "ephemeralSettingTimestamp": stamp,
                "name": name,
                "type": chat_type,
            }
        )
    return out


@dataclass
class ChangeRates:
    """Per :meth:`Simulator.step`, the expected fraction of an instance's chats affected."""

    new: float = 0.01
    rename: float = 0.01
    archive: float = 0.01
    ephemeral: float = 0.01
    removal: float = 0.005
    #: of the chats removed so far, the expected fraction that come back (as they were when
    #: they left), at the front; 0 draws nothing, so the other rates' lists stay the same
    returns: float = 0.0


def evolve(
    chats: list[Any],
    ids: set[str],
    rng: random.Random,
    rates: ChangeRates,
    now: int,
    gone: list[Any] | None = None,
) -> None:
    """Apply one step of change to ``chats`` in place, at simulated time ``now``.

    The kinds of change run in this fixed order; each first draws how many chats it touches,
    from its rate and the length of the list when the step began. ``ids`` holds the ids in
    ``chats`` and is kept in step with it. Entries that are not dicts (a list set by
    :meth:`Simulator.set_chats` may hold anything) still take their draws but are left as
    they are. ``gone`` collects the removed chats, from which ``rates.returns`` brings some
    back, last.
    """
    n = len(chats)
    _remove(chats, ids, rng, randround(rng, rates.removal * n), gone)
    _rename(chats, rng, randround(rng, rates.rename * n))
    _toggle_archive(chats, rng, randround(rng, rates.archive * n))
    _change_ephemeral(chats, rng, randround(rng, rates.ephemeral * n), now)
    _add_activity(chats, rng, randround(rng, _ACTIVITY_RATE * n))
    _add_new(chats, ids, rng, randround(rng, rates.new * n), now)
    if gone is not None:
        _return(chats, ids, rng, gone, randround(rng, rates.returns * len(gone)))


def _to_front(chats: list[Any], index: int) -> None:
    """Move a chat to the head of the list (the list is in activity order, newest first)."""
    chats.insert(0, chats.pop(index))


def _remove(
    chats: list[Any], ids: set[str], rng: random.Random, times: int, kept: list[Any] | None
) -> None:
    """Chats that disappear from the list (into ``kept``, when given)."""
    for _ in range(times):
        if chats:
            gone = chats.pop(rng.randrange(len(chats)))
            gone_id = gone.get("id") if isinstance(gone, dict) else None
            if isinstance(gone_id, str):
                ids.discard(gone_id)
                if kept is not None:
                    kept.append(gone)


def _rename(chats: list[Any], rng: random.Random, times: int) -> None:
    """Chats given a different name (always different from the old one); each moves to the
    front."""
    for _ in range(times):
        if not chats:
            break
        index = rng.randrange(len(chats))
        chat = chats[index]
        if isinstance(chat, dict):
            pool = _GROUP_NAMES if chat.get("type") == "group" else _USER_NAMES
            new_name = rng.choice(pool) + rng.choice(_NAME_SUFFIXES)
            if new_name == chat.get("name"):
                new_name += " ✓"
            chat["name"] = new_name
            _to_front(chats, index)


def _toggle_archive(chats: list[Any], rng: random.Random, times: int) -> None:
    """Chats archived or unarchived; they keep their place in the list."""
    for _ in range(times):
        if not chats:
            break
        chat = chats[rng.randrange(len(chats))]
        if isinstance(chat, dict):
            chat["archive"] = not chat.get("archive")


def _change_ephemeral(chats: list[Any], rng: random.Random, times: int, now: int) -> None:
    """Chats whose disappearing-messages setting changes (to another allowed value) at ``now``;
    each moves to the front."""
    for _ in range(times):
        if not chats:
            break
        index = rng.randrange(len(chats))
        chat = chats[index]
        if isinstance(chat, dict):
            current = chat.get("ephemeralExpiration")
            choices = [v for v in EPHEMERAL_VALUES if v != current]
            chat["ephemeralExpiration"] = rng.choice(choices)
            chat["ephemeralSettingTimestamp"] = now
            _to_front(chats, index)


def _add_activity(chats: list[Any], rng: random.Random, times: int) -> None:
    """Chats with a new message and nothing else changed: they only move to the front."""
    for _ in range(times):
        if chats:
            _to_front(chats, rng.randrange(len(chats)))


def _add_new(chats: list[Any], ids: set[str], rng: random.Random, count: int, now: int) -> None:
    """New chats, at the front; their disappearing-message settings predate ``now``."""
    chats[:0] = make_chats(rng, now, ids, count)


def _return(
    chats: list[Any], ids: set[str], rng: random.Random, gone: list[Any], times: int
) -> None:
    """Removed chats that come back (a new message in a deleted chat, a re-added contact)."""
    for _ in range(times):
        if not gone:
            break
        chat = gone.pop(rng.randrange(len(gone)))
        chat_id = chat.get("id") if isinstance(chat, dict) else None
        if isinstance(chat_id, str) and chat_id not in ids:
            ids.add(chat_id)
            chats.insert(0, chat)

"""The guards: a list that must not be applied as it is (an anomaly), judged without I/O.

* An empty list ``[]``: Green-API documents it as "contact support", not "no chats".
* A mass removal: more than ``mass_removal_threshold`` of the known chats vanish at once.
  It is held back until the chats that went missing are still all missing on
  ``mass_removal_confirmations`` consecutive fetches (new chats may arrive meanwhile); one
  of them coming back means a glitchy partial list and restarts the count. A
  pseudo-random sample of the missing ids stands in for the set, which can be very large,
  so a random partial list is caught at once.

The confirmation streak lives in ``instance_sync_state`` between ticks (``GuardState``).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Set
from dataclasses import dataclass

import orjson

from etl.config import Instance
from etl.errors import ErrorKind

VANISHED_SAMPLE_SIZE = 32


@dataclass(frozen=True, slots=True)
class GuardState:
    """The stored confirmation streak: the sample of the chats missing last time, and how
    many fetches in a row they have been missing (``pending_removal_*`` columns)."""

    sample: str | None = None
    streak: int = 0


CLEAR = GuardState()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the guards decided for one tick."""

    #: the anomaly kind when the tick must not be applied, else None
    anomaly: ErrorKind | None = None
    message: str | None = None
    #: the streak to store, or None to leave the stored one as it is
    save: GuardState | None = None
    #: a mass removal confirmed by this tick (logged by the caller), as text
    confirmed: str | None = None


def vanished_sample(vanished: Set[str]) -> str:
    """Up to 32 of the missing ids, picked by hash (so spread over the set), as JSON."""
    picked = heapq.nsmallest(
        VANISHED_SAMPLE_SIZE,
        vanished,
        key=lambda cid: hashlib.blake2b(
            cid.encode("utf-8", "surrogatepass"), digest_size=8
        ).digest(),
    )
    return orjson.dumps(sorted(picked)).decode()


def parse_vanished_sample(stored: str | None) -> set[str] | None:
    """The sample saved by the last anomaly tick; None when there is none (or an old digest)."""
    if not stored or not stored.startswith("["):
        return None
    try:
        ids = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return None
    return {str(i) for i in ids} if isinstance(ids, list) else None


def judge(
    instance: Instance,
    *,
    received: int,
    present: Set[str],
    vanished: Set[str],
    stored: GuardState,
) -> Verdict:
    """Whether the tick may be applied, and the confirmation streak to keep."""
    # a tick that breaks a run of shrunken lists clears the stored streak
    clear = CLEAR if stored.sample is not None else None
    if received == 0:
        return Verdict(
            ErrorKind.EMPTY_RESPONSE, "getChats returned an empty list; nothing applied", clear
        )
    if not present or len(vanished) / len(present) <= instance.mass_removal_threshold:
        return Verdict(save=clear)
    before = parse_vanished_sample(stored.sample)
    still_missing = before is not None and before <= vanished
    streak = stored.streak + 1 if still_missing else 1
    if streak >= instance.mass_removal_confirmations:
        return Verdict(
            save=CLEAR,
            confirmed=f"{len(vanished)} of {len(present)} chats vanished and stayed missing "
            f"{streak} times in a row; applying",
        )
    return Verdict(
        ErrorKind.MASS_REMOVAL,
        f"{len(vanished)} of {len(present)} known chats vanished at once "
        f"(threshold {instance.mass_removal_threshold:.0%}); not applied, "
        f"confirmation {streak}/{instance.mass_removal_confirmations}",
        GuardState(vanished_sample(vanished), streak),
    )

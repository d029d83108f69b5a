"""Faults: what an instance answers instead of its chat list, and for how many requests.

A fault's ``mode`` picks the body (:data:`_MODE_BODIES`) and how the answer goes on the wire
(``reset`` and ``truncate`` cut it short; every other mode is sent whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Protocol

from etl.simulator.replies import HTML, JSON, Reply, default_body, html_page, sniff_content_type


@dataclass
class Fault:
    """What to do instead of a normal answer for one instance.

    ``mode``: ``normal`` (answer ``status`` with ``body`` or a default body; a plain
    ``Fault(delay=...)`` only delays the normal answer), ``reset`` (headers + part of the body,
    then a TCP reset), ``truncate`` (the first half of the JSON body, with a Content-Length that
    matches what is sent, then close), ``html``, ``object`` (``{"error": "x"}``), ``empty``
    (``[]``) or ``huge`` (``huge_count`` generated chats). Every mode answers with ``status``.
    """

    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    retry_after: str | None = None
    mode: str = "normal"
    times: int | None = None
    huge_count: int = 100_000
    content_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; expected one of {FAULT_MODES}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status out of range: {self.status}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0 or None")
        if self.huge_count < 0:
            raise ValueError("huge_count must be >= 0")

    @property
    def is_pure_delay(self) -> bool:
        """True when the fault only delays an otherwise normal answer."""
        return self.mode == "normal" and self.status == 200 and self.body is None


class BodySource(Protocol):
    """Where the bodies that depend on the simulator's state come from."""

    def chats_body(self, id_instance: int) -> bytes:
        """The instance's full list, serialised (``[]`` for an id that is not simulated)."""
        ...

    def huge_body(self, id_instance: int, huge_count: int) -> bytes:
        """``huge_count`` generated chats, serialised."""
        ...


_Body = tuple[bytes, str]


def _default(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return default_body(fault.status)


def _chats(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return source.chats_body(id_instance), JSON


def _html(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return html_page(fault.status), HTML


def _object(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return b'{"error":"x"}', JSON


def _empty(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return b"[]", JSON


def _huge(fault: Fault, id_instance: int, source: BodySource) -> _Body:
    return source.huge_body(id_instance, fault.huge_count), JSON


#: Each mode's (body, content type) when the fault gives no ``body`` of its own.
_MODE_BODIES: Final[dict[str, Callable[[Fault, int, BodySource], _Body]]] = {
    "normal": _default,
    "reset": _chats,
    "truncate": _chats,
    "html": _html,
    "object": _object,
    "empty": _empty,
    "huge": _huge,
}
FAULT_MODES: Final = frozenset(_MODE_BODIES)
_CUT_SHORT: Final = frozenset({"reset", "truncate"})


def fault_reply(fault: Fault, id_instance: int, source: BodySource) -> Reply:
    """The answer ``fault`` gives for ``id_instance`` (not for a pure delay: see
    :attr:`Fault.is_pure_delay`)."""
    headers = [("Retry-After", fault.retry_after)] if fault.retry_after is not None else []
    if fault.body is not None:
        body, content_type = fault.body, sniff_content_type(fault.body)
    else:
        body, content_type = _MODE_BODIES[fault.mode](fault, id_instance, source)
    if fault.content_type is not None:
        content_type = fault.content_type
    if fault.mode == "empty":
        served: int | None = 0
    elif fault.mode == "huge":
        served = fault.huge_count
    else:
        served = None
    wire_mode = fault.mode if fault.mode in _CUT_SHORT else "normal"
    return Reply(fault.status, body, content_type, headers, wire_mode, served)


@dataclass
class _ActiveFault:
    fault: Fault
    remaining: int | None


class FaultTable:
    """The fault set for each instance id, and how many more requests it applies to.

    Not thread-safe: the simulator's lock guards it.
    """

    def __init__(self) -> None:
        self._active: dict[int, _ActiveFault] = {}

    def set(self, id_instance: int, fault: Fault | None) -> None:
        """Set (a copy of) ``fault`` for one id; None, or ``times=0``, clears it."""
        if fault is None or fault.times == 0:
            self._active.pop(id_instance, None)
        else:
            self._active[id_instance] = _ActiveFault(replace(fault), fault.times)

    def take(self, id_instance: int) -> Fault | None:
        """The fault for this request, consuming one of its ``times``."""
        active = self._active.get(id_instance)
        if active is None:
            return None
        if active.remaining is not None:
            active.remaining -= 1
            if active.remaining <= 0:
                del self._active[id_instance]
        return active.fault

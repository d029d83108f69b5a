"""One 64-bit hash for what chatsync compares across processes (a raw list element, a
chat's stored attributes, a whole answer): xxHash's XXH3, stable in every process, unlike
Python's ``hash``, which is salted per process."""

from __future__ import annotations

from xxhash import xxh3_64_intdigest

#: signed 64-bit, as an ``array('q')`` holds it
_SIGN = 1 << 63


def stable_hash(data: bytes) -> int:
    """A signed 64-bit hash of ``data``, the same in every process, never 0 (0 means
    "none")."""
    return (xxh3_64_intdigest(data) - _SIGN) or 1

"""Answer bodies as compact UTF-8 JSON: orjson when importable, else the standard library."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Final


def _load_fast_dumps() -> Callable[[object], bytes] | None:
    try:
        module = importlib.import_module("orjson")
    except ImportError:
        return None
    dumps: Callable[[object], bytes] = module.dumps
    return dumps


_FAST_DUMPS: Final = _load_fast_dumps()


def dumps(obj: object) -> bytes:
    """Serialise to compact UTF-8 JSON (orjson when available; falls back to json)."""
    if _FAST_DUMPS is not None:
        try:
            return _FAST_DUMPS(obj)
        except Exception:  # e.g. ints beyond 64 bits in a malformed payload
            pass
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: fall back to \u escapes
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")

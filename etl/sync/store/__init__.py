"""One store per database behind one interface (``Store``), chosen once per engine."""

from __future__ import annotations

import functools

from etl.sync.store.base import (
    Claim,
    Locked,
    RunRow,
    SnapshotWrite,
    Store,
    TickState,
    written_listeners,
)
from etl.sync.store.postgresql import PostgresStore
from etl.sync.store.sqlite import SQLiteStore

__all__ = [
    "Claim",
    "Locked",
    "PostgresStore",
    "RunRow",
    "SnapshotWrite",
    "SQLiteStore",
    "Store",
    "TickState",
    "store_for",
    "written_listeners",
]


@functools.cache
def store_for(dialect: str) -> Store:
    """The store of a dialect (``engine.dialect.name``), built once."""
    cls = Store.by_dialect().get(dialect)
    if cls is None:
        raise NotImplementedError(f"unsupported database: {dialect}")
    return cls()

"""The records a tick hands from one step to the next (``etl.sync.syncer``)."""

from __future__ import annotations

from dataclasses import dataclass

from etl.config import Instance
from etl.payload import ChatRecord, DecodedChats
from etl.sync.linking import Asked
from etl.sync.outcome import SyncOutcome
from etl.sync.plan import IdChange
from etl.sync.snapshot import Snapshot
from etl.sync.store import Claim


@dataclass(slots=True, eq=False)
class Pending:
    """A fetched and decoded tick waiting for its write."""

    instance: Instance
    decoded: DecodedChats
    body: bytes
    #: the snapshot whose raw hashes the decode skipped unchanged elements against
    decoded_with: Snapshot | None
    #: the fetch's outcome (started_at, http_status, attempts)
    fetched: SyncOutcome
    t0: float
    #: the checkWhatsapp answers an id switch of this list needs (``linking``)
    asked: Asked
    #: the lease the tick is made under (several replicas), or None
    claim: Claim | None


@dataclass(slots=True, eq=False)
class Prefetch:
    """A steady tick's read-back, chosen before the lock so that the store can send it
    with the lock (``Store.reads_with_lock``)."""

    snap: Snapshot
    candidates: list[ChatRecord]
    read_ids: list[str]
    #: the list with its ids mapped to the chats of ``snap`` (``identity.translate``)
    decoded: DecodedChats
    changes: list[IdChange]

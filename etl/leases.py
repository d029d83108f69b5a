"""Several `etl run` replicas on one PostgreSQL: each instance synced by exactly one replica.

PostgreSQL is the coordinator; there is no consensus of our own:

* every replica schedules every instance, and before each sync it *claims* the instance
  with one atomic ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on
  ``instance_sync_state``: it wins when the lease is free, expired, or already its own.
  The lease lasts 1.25 intervals and the owner renews it every tick, so while the owner
  lives nobody else syncs that instance; when it dies, the lease runs out and the next
  replica whose job fires takes the instance over (within about one interval).
* replicas heartbeat into ``replicas``. Each holds at most its fair share,
  ceil(instances / live replicas); a replica above its share releases leases at their
  next tick, so a replica that joins later gets work too.
* the sync transaction itself still takes the per-instance advisory lock, so even a
  misbehaving clock cannot make two writers interleave.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import cast

from sqlalchemy import Engine, Table, text

from etl.config import Instance
from etl.models import Replica

log = logging.getLogger(__name__)

replicas_t = cast(Table, Replica.__table__)

LEASE_FACTOR = 1.25

_CLAIM = text(
    """
INSERT INTO instance_sync_state
    (instance_id, pending_removal_streak, updated_at, lease_owner, lease_until)
VALUES (:iid, 0, now(), :me, now() + make_interval(secs => :ttl))
ON CONFLICT (instance_id) DO UPDATE
SET lease_owner = :me, lease_until = now() + make_interval(secs => :ttl)
WHERE instance_sync_state.lease_owner IS NULL
   OR instance_sync_state.lease_owner = :me
   OR instance_sync_state.lease_until IS NULL
   OR instance_sync_state.lease_until < now()
RETURNING lease_owner
"""
)

_RELEASE = text(
    """
UPDATE instance_sync_state SET lease_owner = NULL, lease_until = NULL
WHERE instance_id = :iid AND lease_owner = :me
"""
)

_RELEASE_ALL = text(
    "UPDATE instance_sync_state SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = :me"
)

_HEARTBEAT = text(
    """
INSERT INTO replicas (replica_id, hostname, pid, started_at, heartbeat_at)
VALUES (:me, :host, :pid, now(), now())
ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now()
"""
)

_LIVE = text(
    "SELECT COUNT(*) FROM replicas WHERE heartbeat_at > now() - make_interval(secs => :ttl)"
)


class LeaseManager:
    """Claims instances for this replica. A no-op (always True) off PostgreSQL."""

    def __init__(
        self,
        engine: Engine,
        instances: Sequence[Instance],
        *,
        replica_id: str | None = None,
        heartbeat_seconds: float | None = None,
    ) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self.replica_id = replica_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        # Heartbeat twice per (shortest) interval, at most every 10 s; a replica counts as
        # alive for three heartbeats, so a dead one stops holding a fair share quickly.
        shortest = min((i.interval_seconds for i in instances), default=60)
        self.heartbeat_seconds = heartbeat_seconds or min(10.0, max(1.0, shortest / 2))
        self.total = len(instances)
        self._owned: set[int] = set()
        self._live = 1
        self._lock = threading.Lock()

    @property
    def owned(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._owned)

    def fair_share(self) -> int:
        return max(1, math.ceil(self.total / max(1, self._live)))

    def heartbeat(self) -> None:
        """Say we are alive and learn how many replicas are."""
        if not self.enabled:
            return
        with self.engine.begin() as conn:
            conn.execute(
                _HEARTBEAT,
                {"me": self.replica_id, "host": socket.gethostname(), "pid": os.getpid()},
            )
            live = conn.execute(_LIVE, {"ttl": self.heartbeat_seconds * 3}).scalar_one()
        with self._lock:
            self._live = max(1, int(live))

    def claim(self, instance: Instance) -> bool:
        """True when this replica should sync ``instance`` now (and holds its lease)."""
        if not self.enabled:
            return True
        iid = instance.id_instance
        with self._lock:
            mine = iid in self._owned
            over_share = len(self._owned) > self.fair_share()
            full = len(self._owned) >= self.fair_share()
        if mine and over_share:
            self.release(instance)
            log.info("instance %s: released to rebalance replicas", iid)
            return False
        if not mine and full:
            return False
        ttl = instance.interval_seconds * LEASE_FACTOR
        with self.engine.begin() as conn:
            won = conn.execute(_CLAIM, {"iid": iid, "me": self.replica_id, "ttl": ttl}).first()
        with self._lock:
            if won is not None:
                if not mine:
                    log.info("instance %s: lease taken by this replica", iid)
                self._owned.add(iid)
            else:
                self._owned.discard(iid)
        return won is not None

    def release(self, instance: Instance) -> None:
        if not self.enabled:
            return
        with self.engine.begin() as conn:
            conn.execute(_RELEASE, {"iid": instance.id_instance, "me": self.replica_id})
        with self._lock:
            self._owned.discard(instance.id_instance)

    def release_all(self) -> None:
        """At shutdown: hand every lease back so other replicas take over at once."""
        if not self.enabled:
            return
        with self.engine.begin() as conn:
            conn.execute(_RELEASE_ALL, {"me": self.replica_id})
            conn.execute(
                text("DELETE FROM replicas WHERE replica_id = :me"), {"me": self.replica_id}
            )
        with self._lock:
            self._owned.clear()

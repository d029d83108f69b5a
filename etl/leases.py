"""Several `etl run` replicas on one PostgreSQL: each instance owned by one replica at a
time, every write fenced by the claim it was made under.

PostgreSQL is the coordinator; there is no consensus of our own (docs/scaling.md):

* **A lease per replica.** Each replica renews one row in ``replicas`` (``lease_until``,
  from the database's clock) on a timer of its own, every ``heartbeat_seconds``. While
  that lease lasts, the replica owns the instances whose ``instance_sync_state.
  lease_owner`` names it; renewing it renews them all, so the cost does not grow with the
  instances a replica holds.
* **Claims in batches.** A replica below its fair share, ceil(instances / live replicas),
  claims instances that are unowned or whose owner's lease has passed, the most overdue
  first, up to its share in one ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED
  LIMIT n)``: replicas claiming at once skip each other's rows instead of waiting or
  fighting, and after a replica dies each survivor sends one such statement per heartbeat
  until it holds its share, whatever the fleet's size: no stampede. A replica claims
  nothing at its first heartbeat, so that replicas started together have all said they
  are alive before any of them counts its share. A replica above its share hands the
  excess back.
* **A fencing epoch per instance.** A claim bumps ``lease_epoch``. Each tick carries the
  claim it started under (``Claim``: owner and epoch), and the store's first statement of
  the tick's transaction bumps the state only where both still match (``etl.sync.store``):
  a replica that stalled past its lease (GC, SIGSTOP, a paused VM) and woke up after
  another replica took the instance over has its write refused, and the tick is recorded
  as ``lease_lost``.
* **Only what it owns is scheduled.** The daemon adds a job when an instance is gained
  and removes it when it is lost or handed back (``etl.scheduler``); each instance's next
  due time and backoff are in its state row, so a new owner or a restart honours them.
* A replica that wakes from a stall (its lease has passed) reads back which instances it
  still owns, drops the others and forgets them; it starts no tick while its lease may
  have passed.

On SQLite (one process by design) there are no leases: every configured instance is this
process's, and ticks are not fenced.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from etl.config import Instance
from etl.sync.store import Claim

log = logging.getLogger(__name__)

#: the most instances one claim statement takes (a bound on the statement, not a pace)
CLAIM_BATCH = 5000

#: the replica's lease, renewed by every heartbeat; returns the lease it had before (NULL
#: for a new row), the database's clock and how many other replicas are alive
_HEARTBEAT = text(
    """
WITH old AS (SELECT lease_until FROM replicas WHERE replica_id = :me)
INSERT INTO replicas (replica_id, hostname, pid, started_at, heartbeat_at, lease_until)
VALUES (:me, :host, :pid, now(), now(), now() + make_interval(secs => :ttl))
ON CONFLICT (replica_id) DO UPDATE
SET heartbeat_at = now(), lease_until = excluded.lease_until
RETURNING (SELECT lease_until FROM old) AS previous, now() AS at,
          (SELECT COUNT(*) FROM replicas r
           WHERE r.lease_until > now() AND r.replica_id <> :me) AS others
"""
)

#: an instance is free when nobody owns it, or its owner's lease has passed
_FREE = """(s.lease_owner IS NULL OR NOT EXISTS (
      SELECT 1 FROM replicas r WHERE r.replica_id = s.lease_owner AND r.lease_until > now()))"""

#: claim up to :n free instances of :ids, the most overdue first; the condition is checked
#: again on the locked row (another replica may have claimed it since the snapshot)
_CLAIM = text(
    f"""
WITH c AS (
  SELECT s.instance_id FROM instance_sync_state s
  WHERE s.instance_id = ANY(:ids) AND {_FREE}
  ORDER BY s.next_due_at NULLS FIRST, s.instance_id
  LIMIT :n
  FOR UPDATE OF s SKIP LOCKED
)
UPDATE instance_sync_state s
SET lease_owner = :me, lease_epoch = s.lease_epoch + 1
FROM c WHERE s.instance_id = c.instance_id AND {_FREE}
RETURNING s.instance_id, s.lease_epoch, s.next_due_at, s.failures, s.failure_kind
"""  # noqa: S608  (_FREE is this module's own SQL)
)

#: which instances this replica owns, as the database says (after its lease had passed)
_OWNED = text(
    "SELECT instance_id, lease_epoch, next_due_at, failures, failure_kind "
    "FROM instance_sync_state WHERE lease_owner = :me"
)

#: every configured instance has a state row to claim
#: (only the missing ones: a conflict with a row that another transaction holds would
#: wait for that transaction, and a replica stalled inside one would hold up this start)
_STATE_ROWS = text(
    """
INSERT INTO instance_sync_state (instance_id, pending_removal_streak, updated_at)
SELECT i, 0, now() FROM unnest(CAST(:ids AS bigint[])) AS i
WHERE NOT EXISTS (SELECT 1 FROM instance_sync_state s WHERE s.instance_id = i)
ON CONFLICT (instance_id) DO NOTHING
"""
)

#: hand instances back (rebalancing, shutdown); the next claim bumps their epoch
_RELEASE = text(
    "UPDATE instance_sync_state SET lease_owner = NULL "
    "WHERE lease_owner = :me AND instance_id = ANY(:ids)"
)
_RELEASE_ALL = text("UPDATE instance_sync_state SET lease_owner = NULL WHERE lease_owner = :me")
_GONE = text("DELETE FROM replicas WHERE replica_id = :me")


@dataclass(frozen=True, slots=True)
class Held:
    """An instance this replica owns: its fencing epoch, when it is due, and its failures
    in a row (the backoff the replica takes over)."""

    instance_id: int
    epoch: int
    next_due_at: datetime | None
    failures: int = 0
    failure_kind: str | None = None

    @classmethod
    def of(cls, row: Any) -> Held:
        return cls(
            row.instance_id, row.lease_epoch, row.next_due_at, row.failures, row.failure_kind
        )


@dataclass(slots=True)
class Beat:
    """What one heartbeat changed: instances gained (to schedule), lost while this replica
    stalled (to drop), and how many it holds above its fair share (to hand back)."""

    gained: list[Held] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    excess: int = 0


def default_heartbeat(instances: Sequence[Instance]) -> float:
    """A quarter of the shortest interval, between 0.5 and 10 s: a dead replica's
    instances are free within a few heartbeats, well inside one interval."""
    shortest = min((i.interval_seconds for i in instances), default=60)
    return min(10.0, max(0.5, shortest / 4))


class LeaseManager:
    """This replica's lease and the instances it owns. Off PostgreSQL, or with leases
    disabled, it owns every instance and gives no claims (ticks are not fenced)."""

    def __init__(
        self,
        engine: Engine,
        instances: Sequence[Instance],
        *,
        replica_id: str | None = None,
        heartbeat_seconds: float | None = None,
        lease_seconds: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self.replica_id = replica_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.ids = [i.id_instance for i in instances]
        self.heartbeat_seconds = heartbeat_seconds or default_heartbeat(instances)
        self.lease_seconds = lease_seconds or 3 * self.heartbeat_seconds
        #: the most instances one statement claims (a bound on its size)
        self.batch = CLAIM_BATCH
        self.monotonic = monotonic
        self._beats = 0
        self._owned: dict[int, int] = {}  # instance id -> epoch
        self._valid_until = -math.inf  # monotonic; when the lease may have passed
        self._live = 1
        self._lock = threading.Lock()
        #: why the last heartbeat failed (the database is unreachable), or None
        self.unreachable: str | None = None
        #: statements sent, by kind (claim, heartbeat, ...): the coordination's cost
        self.statements: Counter[str] = Counter()
        #: ticks not started since the last heartbeat because the lease was not confirmed
        self.unconfirmed = 0

    @property
    def owned(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._owned)

    def fair_share(self) -> int:
        return max(1, math.ceil(len(self.ids) / max(1, self._live)))

    def start(self) -> None:
        """Make sure every configured instance has a state row that can be claimed."""
        if self.enabled and self.ids:
            with self.engine.begin() as conn:
                conn.execute(_STATE_ROWS, {"ids": self.ids})
            self.statements["state_rows"] += 1

    def claim(self, instance_id: int) -> Claim | None:
        """The claim a tick of ``instance_id`` is made under: None when this replica does
        not own it, or its lease may have passed (leases off: always None, unfenced)."""
        if not self.enabled:
            return None
        with self._lock:
            epoch = self._owned.get(instance_id)
            # by this process's clock, counted from before the last renewal was sent: the
            # database's lease_until is no earlier. A tick that starts with little lease
            # left is safe all the same: its write is fenced.
            valid = self.monotonic() < self._valid_until
            if epoch is not None and not valid:
                self.unconfirmed += 1
            # the last heartbeat could not reach the database: a tick started now could
            # not write what it fetched, so it does not spend a request on the API
            valid = valid and self.unreachable is None
        if epoch is None or not valid:
            return None
        return Claim(self.replica_id, epoch, idle_ms=int(self.lease_seconds * 1000))

    def beat(self) -> Beat:
        """Renew the lease, learn what was lost while it had passed, and claim free
        instances up to the fair share; raises SQLAlchemyError when the database is
        unreachable (``unreachable`` says why)."""
        if not self.enabled:
            return Beat()
        try:
            return self._beat()
        except SQLAlchemyError as exc:
            self.unreachable = type(exc).__name__
            raise

    def _beat(self) -> Beat:
        sent = self.monotonic()
        if self.unconfirmed:
            log.warning(
                "%d ticks were not started: this replica's lease had not been renewed "
                "within lease_seconds (%.1f s; a busy or paused process, or a slow database)",
                self.unconfirmed,
                self.lease_seconds,
            )
            self.unconfirmed = 0
        beat = Beat()
        with self.engine.begin() as conn:
            row = conn.execute(
                _HEARTBEAT,
                {
                    "me": self.replica_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "ttl": self.lease_seconds,
                },
            ).one()
            self.statements["heartbeat"] += 1
            if row.previous is None or row.previous <= row.at:
                beat.lost, beat.gained = self._reconcile(conn)
        with self._lock:
            self._valid_until = sent + self.lease_seconds
            self._live = int(row.others) + 1
            self.unreachable = None
            held = len(self._owned)
        self._beats += 1
        share = self.fair_share()
        beat.excess = max(0, held - share)
        # the first heartbeat only says this replica is alive (see the module's docstring)
        if held < share and self.ids and self._beats > 1:
            beat.gained += self._claim(min(share - held, self.batch))
        return beat

    def _reconcile(self, conn: Connection) -> tuple[list[int], list[Held]]:
        """After the lease had passed: keep what the database still says is ours (and
        adopt what it says is ours that this process had let go of)."""
        rows = conn.execute(_OWNED, {"me": self.replica_id}).all()
        self.statements["reconcile"] += 1
        found = {r.instance_id: r.lease_epoch for r in rows}
        configured = set(self.ids)
        with self._lock:
            lost = [i for i, e in self._owned.items() if found.get(i) != e]
            for iid in lost:
                del self._owned[iid]
            adopted = [
                Held.of(r)
                for r in rows
                if r.instance_id not in self._owned and r.instance_id in configured
            ]
            for h in adopted:
                self._owned[h.instance_id] = h.epoch
        if lost:
            log.warning(
                "this replica's lease had passed: %d instances were taken over by others", len(lost)
            )
        return lost, adopted

    def _claim(self, n: int) -> list[Held]:
        with self.engine.begin() as conn:
            rows = conn.execute(_CLAIM, {"ids": self.ids, "n": n, "me": self.replica_id}).all()
        self.statements["claim"] += 1
        gained = [Held.of(r) for r in rows]
        with self._lock:
            for h in gained:
                self._owned[h.instance_id] = h.epoch
        if gained:
            log.info("claimed %d instances (%d held)", len(gained), len(self._owned))
        return gained

    def release(self, instance_ids: Sequence[int]) -> None:
        """Hand instances back (rebalancing); another replica claims them."""
        if not self.enabled or not instance_ids:
            return
        with self._lock:
            for iid in instance_ids:
                self._owned.pop(iid, None)
        with self.engine.begin() as conn:
            conn.execute(_RELEASE, {"me": self.replica_id, "ids": list(instance_ids)})
        self.statements["release"] += 1
        log.info("handed %d instances back to rebalance replicas", len(instance_ids))

    def lost(self, instance_id: int, epoch: int) -> bool:
        """A tick made under ``epoch`` found its claim gone (``lease_lost``): the instance
        is another's now, unless this replica has claimed it again since (a newer epoch,
        which the stale tick must not drop); returns whether it was dropped."""
        with self._lock:
            if self._owned.get(instance_id) != epoch:
                return False
            del self._owned[instance_id]
            return True

    def release_all(self) -> None:
        """At shutdown: hand every instance back so other replicas take over at once."""
        if not self.enabled:
            return
        with self.engine.begin() as conn:
            conn.execute(_RELEASE_ALL, {"me": self.replica_id})
            conn.execute(_GONE, {"me": self.replica_id})
        with self._lock:
            self._owned.clear()

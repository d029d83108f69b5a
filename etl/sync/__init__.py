"""One instance's sync, in parts: a pure plan, the guards, the snapshot cache, health and
backoff, group commit, and one store per database, tied together by ``Syncer``.

    syncer.py        the orchestrator: fetch -> decode -> identify -> plan -> store
    tick.py          the records a tick hands from one step to the next
    identify.py      the identify step: a new instance's snapshot, lookups, the verdict
    identity.py      a chat's other ids; id switches and when to hold them (no I/O)
    linking.py       checkWhatsapp lookups, rate-limited, within the tick's budget
    plan.py          the decoded list + stored rows + now -> the writes (no I/O)
    rules.py         when an ephemeral period starts (``choose_valid_from``)
    guards.py        the empty-list and mass-removal guards (no I/O)
    snapshot.py      fingerprints of what is stored, per instance; kept, persisted
    fingerprints.py  the stored attributes a tick compares, as one number
    health.py        consecutive failures and backoff
    failures.py      failed ticks: their run row and backoff state
    group_commit.py  ticks queued behind a write are written together
    backlog.py       failed ticks kept while the database is unreachable
    registry.py      the configured instances mirrored into ``instances``
    outcome.py       ``SyncOutcome``, a tick's ``sync_runs`` row
    store/           one store per database (``Store``; SQLite, PostgreSQL)
"""

from __future__ import annotations

from etl.clock import utcnow
from etl.models import chats_t, events_t, history_t, runs_t
from etl.sync.health import backoff_seconds
from etl.sync.outcome import SyncOutcome
from etl.sync.registry import register_instances
from etl.sync.rules import MAX_CLOCK_SKEW, choose_valid_from
from etl.sync.syncer import Syncer

__all__ = [
    "MAX_CLOCK_SKEW",
    "SyncOutcome",
    "Syncer",
    "backoff_seconds",
    "chats_t",
    "choose_valid_from",
    "events_t",
    "history_t",
    "register_instances",
    "runs_t",
    "utcnow",
]

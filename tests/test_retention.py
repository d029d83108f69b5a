"""Retention of sync_runs: only old rows go, in batches of their own short transactions,
references from the history and the events are cleared (never left dangling), on both
backends; the daemon runs it as a job; `etl db prune` runs it once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, Table, event, insert, text

from etl.cli import cli
from etl.client import GreenApiClient
from etl.config import RetentionSettings
from etl.models import ChatEphemeralHistory, ChatEvent
from etl.retention import prune_sync_runs
from etl.scheduler import Daemon
from etl.sync import Syncer, utcnow
from tests.factories import rows, scalar
from tests.test_status import NOW, add_chats, add_instance, add_run

history_t = cast(Table, ChatEphemeralHistory.__table__)
events_t = cast(Table, ChatEvent.__table__)


def seed(engine: Engine, *, old: int = 10, recent: int = 3) -> tuple[list[int], list[int]]:
    """``old`` runs 40+ days back and ``recent`` ones today; history and event rows that
    point at the oldest and the newest run. Returns (old ids, recent ids)."""
    add_instance(engine, 1, "a")
    add_chats(engine, 1, present=2)
    old_ids = [add_run(engine, 1, NOW - timedelta(days=40, minutes=k)) for k in range(old)]
    new_ids = [add_run(engine, 1, NOW - timedelta(minutes=k)) for k in range(recent)]
    with engine.begin() as conn:
        for chat, (run, valid_to) in enumerate(
            [(old_ids[-1], NOW - timedelta(days=1)), (new_ids[0], None)]
        ):
            conn.execute(
                insert(history_t).values(
                    instance_id=1,
                    chat_id=f"{chat}@c.us",
                    ephemeral_expiration=0,
                    valid_from=NOW - timedelta(days=41),
                    valid_to=valid_to,
                    sync_run_id=run,
                )
            )
        for run in (old_ids[-1], old_ids[0], new_ids[0]):
            conn.execute(
                insert(events_t).values(
                    instance_id=1,
                    chat_id="0@c.us",
                    event_type="renamed",
                    occurred_at=NOW,
                    sync_run_id=run,
                )
            )
    return old_ids, new_ids


class Statements:
    """Counts DELETEs on sync_runs and COMMITs issued through an engine."""

    def __init__(self, engine: Engine) -> None:
        self.deletes = 0
        self.commits = 0
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM SYNC_RUNS"):
            self.deletes += 1

    def _commit(self, _conn: Any) -> None:
        self.commits += 1


def test_prunes_only_old_rows_in_batches_and_keeps_references_valid(engine: Engine) -> None:
    old_ids, new_ids = seed(engine)
    counted = Statements(engine)
    n = prune_sync_runs(engine, older_than_days=30, batch_size=4, now=NOW)
    assert n == 10
    assert (counted.deletes, counted.commits) == (3, 3)  # 4 + 4 + 2, each committed alone
    assert [r.id for r in rows(engine, "SELECT id FROM sync_runs ORDER BY id")] == new_ids
    history = rows(engine, "SELECT chat_id, sync_run_id FROM chat_ephemeral_history ORDER BY 1")
    assert [(h.chat_id, h.sync_run_id) for h in history] == [
        ("0@c.us", None),
        ("1@c.us", new_ids[0]),
    ]
    events = rows(engine, "SELECT sync_run_id FROM chat_events ORDER BY id")
    assert [e.sync_run_id for e in events] == [None, None, new_ids[0]]
    dangling = "SELECT COUNT(*) FROM {t} x WHERE x.sync_run_id IS NOT NULL AND NOT EXISTS "
    dangling += "(SELECT 1 FROM sync_runs r WHERE r.id = x.sync_run_id)"
    for table in ("chat_ephemeral_history", "chat_events"):
        assert scalar(engine, dangling.format(t=table)) == 0
    if engine.dialect.name == "sqlite":
        assert rows(engine, "PRAGMA foreign_key_check") == []
    # the views built on these tables still answer
    assert scalar(engine, "SELECT COUNT(*) FROM instance_sync_health") == 1
    assert prune_sync_runs(engine, older_than_days=30, batch_size=4, now=NOW) == 0


def test_prune_can_be_stopped_and_turned_off(engine: Engine) -> None:
    seed(engine, old=5, recent=1)
    assert prune_sync_runs(engine, older_than_days=0, now=NOW) == 0  # 0 days = keep forever
    stops = iter([False, True])
    n = prune_sync_runs(
        engine, older_than_days=30, batch_size=2, now=NOW, should_stop=lambda: next(stops)
    )
    assert n == 2  # one batch, then stopped between batches
    assert prune_sync_runs(engine, older_than_days=30, batch_size=100, now=NOW) == 3
    with pytest.raises(ValueError):
        prune_sync_runs(engine, older_than_days=30, batch_size=0)


@pytest.mark.postgres
@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_one_replica_prunes_at_a_time_on_postgresql(engine: Engine) -> None:
    seed(engine, old=3, recent=1)
    with engine.connect() as other:  # another replica in the middle of a batch
        other.execute(text("SELECT pg_advisory_xact_lock(4244, 0)"))
        assert prune_sync_runs(engine, older_than_days=30, now=NOW) == 0
        other.rollback()
    assert prune_sync_runs(engine, older_than_days=30, now=NOW) == 3


@pytest.fixture
def idle_daemon(engine: Engine) -> Iterator[Daemon]:
    """A daemon with no instance to sync, pruning every second."""
    client = GreenApiClient()
    daemon = Daemon(
        syncer=Syncer(engine, client),
        instances=[],
        retention=RetentionSettings(sync_runs_days=30, batch_size=2, interval_seconds=1),
    )
    yield daemon
    daemon.stop()
    client.close()


def test_the_daemon_prunes_on_its_interval(engine: Engine, idle_daemon: Daemon) -> None:
    add_instance(engine, 1, "a")
    now = utcnow()
    for k in range(5):
        add_run(engine, 1, now - timedelta(days=31, minutes=k))
    keep = add_run(engine, 1, now - timedelta(days=29))
    idle_daemon.start()
    deadline = time.monotonic() + 10
    while scalar(engine, "SELECT COUNT(*) FROM sync_runs") > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r.id for r in rows(engine, "SELECT id FROM sync_runs")] == [keep]


def test_db_prune_command(engine: Engine, tmp_path: Path) -> None:
    seed(engine)
    config = tmp_path / "etl.toml"
    config.write_text("[retention]\nsync_runs_days = 0\n", encoding="utf-8")
    url = engine.url.render_as_string(hide_password=False)
    args = ["db", "prune", "--config", str(config), "--database-url", url]
    off = CliRunner().invoke(cli, args, prog_name="etl")
    assert off.exit_code == 2 and "pass --days N" in off.output
    result = CliRunner().invoke(cli, [*args, "--days", "30", "--batch-size", "3"], prog_name="etl")
    assert result.exit_code == 0, result.output
    assert "pruned 10 sync_runs rows older than 30 days" in result.output
    assert scalar(engine, "SELECT COUNT(*) FROM sync_runs") == 3

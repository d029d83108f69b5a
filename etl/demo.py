"""``etl demo``: the real scheduler against the bundled simulator, then a look at the data.

The command line parses the options and sets up logging; this module runs the demo and
says what it does through ``echo`` (one line per call).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text

from etl.client import GreenApiClient
from etl.config import load_config
from etl.db import make_engine, upgrade
from etl.redact import redact_url
from etl.scheduler import Daemon
from etl.sync import Syncer, register_instances

DEMO_DATABASE_URL = "sqlite:///chats-demo.db"

DEMO_QUERIES: list[tuple[str, str]] = [
    (
        "Chats with disappearing messages on, per instance",
        """SELECT i.label, COUNT(*) AS chats_with_ephemeral
FROM chats c JOIN instances i ON i.id_instance = c.instance_id
WHERE c.removed_at IS NULL AND c.ephemeral_expiration > 0
GROUP BY i.label ORDER BY i.label""",
    ),
    (
        "Latest ephemeral setting changes (SCD2 history)",
        """SELECT h.instance_id, h.chat_id, h.ephemeral_expiration, h.valid_from, h.valid_to
FROM chat_ephemeral_history h
JOIN (SELECT instance_id, chat_id FROM chat_ephemeral_history
      WHERE valid_to IS NOT NULL GROUP BY instance_id, chat_id) changed
  ON changed.instance_id = h.instance_id AND changed.chat_id = h.chat_id
ORDER BY h.instance_id, h.chat_id, h.valid_from LIMIT 6""",
    ),
]


DEMO_COUNTS = {
    "instances": "SELECT COUNT(*) FROM instances",
    "present": "SELECT COUNT(*) FROM chats WHERE removed_at IS NULL",
    "removed": "SELECT COUNT(*) FROM chats WHERE removed_at IS NOT NULL",
    "changes": "SELECT COUNT(*) FROM chat_ephemeral_history WHERE valid_to IS NOT NULL",
    "history": "SELECT COUNT(*) FROM chat_ephemeral_history",
}


def run_demo(
    *,
    instances: int,
    chats: int,
    ticks: int,
    interval: int,
    database_url: str | None,
    echo: Callable[[str], None],
) -> None:
    """Simulate ``instances`` x ``chats``, sync them ``ticks`` times ``interval`` seconds
    apart into ``database_url`` (default: ``DEMO_DATABASE_URL``, recreated), then print
    counts and two queries' results."""
    from etl.simulator import ChangeRates, Simulator  # only the demo needs it

    url = database_url or DEMO_DATABASE_URL
    if url == DEMO_DATABASE_URL:
        for suffix in ("", "-wal", "-shm"):
            Path(f"chats-demo.db{suffix}").unlink(missing_ok=True)
    rates = ChangeRates(new=0.05, rename=0.05, archive=0.05, ephemeral=0.1, removal=0.02)
    with (
        Simulator(
            instances=instances, chats=chats, seed=42, rates=rates, tick_seconds=interval
        ) as sim,
        tempfile.TemporaryDirectory() as tmp,
    ):
        config_path = Path(tmp) / "demo.toml"
        config_path.write_text(sim.config_toml(interval_seconds=interval), encoding="utf-8")
        config_path.chmod(0o600)
        cfg = load_config(config_path=str(config_path), database_url=url)
        engine = make_engine(cfg.database_url)
        upgrade(engine)
        register_instances(engine, cfg.instances)
        client = GreenApiClient()
        daemon = Daemon(syncer=Syncer(engine, client), instances=cfg.instances, max_workers=4)
        echo(
            f"demo: {instances} simulated instances x {chats} chats at {sim.url}, "
            f"{ticks} ticks of {interval}s into {redact_url(url)} ..."
        )
        daemon.run_for(ticks * interval + 0.5)
        client.close()
        try:
            print_summary(engine, echo)
        finally:
            engine.dispose()


def print_summary(engine: Engine, echo: Callable[[str], None]) -> None:
    """What the demo stored: counts, then ``DEMO_QUERIES`` with their results."""
    with engine.connect() as conn:
        n = {key: conn.execute(text(sql)).scalar_one() for key, sql in DEMO_COUNTS.items()}
        runs = conn.execute(
            text("SELECT status, COUNT(*) FROM sync_runs GROUP BY status ORDER BY status")
        ).all()
        echo("")
        echo(f"instances:          {n['instances']}")
        echo(f"chats:              {n['present']} present, {n['removed']} removed")
        echo(f"ephemeral changes:  {n['changes']} (history rows: {n['history']})")
        echo("sync runs:          " + ", ".join(f"{c} {s}" for s, c in runs))
        for title, sql in DEMO_QUERIES:
            echo(f"\n-- {title}\n{sql};")
            for row in conn.execute(text(sql)):
                echo("   " + " | ".join(str(v) for v in row))

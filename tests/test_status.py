"""Status facts from the database (per instance, and the 24-hour chart buckets), ``etl status``
as a table and as JSON, and the progress line of ``etl sync --once`` on a terminal."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from click.testing import CliRunner
from sqlalchemy import Engine, Table, insert

from etl.cli import cli
from etl.models import Chat, InstanceRow, SyncRun
from etl.progress import ProgressLine
from etl.redact import register_secret
from etl.simulator import Fault, Simulator
from etl.status import (
    RecentRuns,
    instance_status,
    recent_runs,
    state,
    status_document,
    summary,
)
from tests.conftest import CANARY
from tests.test_cli import write_config

runs_t = cast(Table, SyncRun.__table__)
chats_t = cast(Table, Chat.__table__)
instances_t = cast(Table, InstanceRow.__table__)

NOW = datetime(2026, 11, 26, 12, 10, tzinfo=UTC)


# -- builders shared with test_web, test_retention and the browser test ---------------------


def add_instance(engine: Engine, iid: int, label: str, *, enabled: bool = True) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(instances_t).values(
                id_instance=iid,
                label=label,
                api_url="https://api.example",
                enabled=enabled,
                created_at=NOW,
                updated_at=NOW,
            )
        )


def add_run(
    engine: Engine,
    iid: int,
    started_at: datetime,
    status: str = "ok",
    *,
    duration_ms: int = 100,
    error_kind: str | None = None,
    error: str | None = None,
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(runs_t)
                .values(
                    instance_id=iid,
                    started_at=started_at,
                    finished_at=started_at + timedelta(milliseconds=duration_ms),
                    status=status,
                    error_kind=error_kind,
                    error=error,
                    attempts=1,
                    duration_ms=duration_ms,
                )
                .returning(runs_t.c.id)
            ).scalar_one()
        )


def add_chats(engine: Engine, iid: int, present: int, removed: int = 0) -> None:
    rows: list[dict[str, Any]] = [
        {
            "instance_id": iid,
            "chat_id": f"{i}@c.us",
            "chat_type": "user",
            "name": f"chat {i}",
            "archived": False,
            "ephemeral_expiration": 0,
            "first_seen_at": NOW,
            "updated_at": NOW,
            "removed_at": NOW if i >= present else None,
        }
        for i in range(present + removed)
    ]
    with engine.begin() as conn:
        conn.execute(insert(chats_t), rows)


def fleet(engine: Engine) -> None:
    """Four instances: healthy, failing after a success, never synced, disabled."""
    add_instance(engine, 1, "Sales desk")
    add_instance(engine, 2, "Support <b>line</b>")
    add_instance(engine, 3, "Fresh")
    add_instance(engine, 4, "Retired", enabled=False)
    add_chats(engine, 1, present=5, removed=2)
    add_chats(engine, 2, present=3)
    t = NOW - timedelta(minutes=10)
    add_run(engine, 1, t, duration_ms=120)
    add_run(engine, 1, t + timedelta(minutes=1), duration_ms=80)
    add_run(engine, 2, t, duration_ms=90)
    for k in range(1, 4):
        add_run(
            engine,
            2,
            t + timedelta(minutes=k),
            "failed",
            duration_ms=1500,
            error_kind="unauthorized",
            error=f"getChats on api.example: HTTP 401: token {CANARY} refused",
        )
    add_run(engine, 4, t - timedelta(days=3), "anomaly", error_kind="empty_response", error="x")


# -- per-instance facts ----------------------------------------------------------------------


def test_instance_status_reads_every_fact(engine: Engine) -> None:
    register_secret(CANARY)
    fleet(engine)
    by_id = {s.instance_id: s for s in instance_status(engine)}
    assert set(by_id) == {1, 2, 3, 4}

    ok = by_id[1]
    assert (ok.label, ok.enabled, ok.last_status, ok.chats) == ("Sales desk", True, "ok", 5)
    assert ok.last_run_at == NOW - timedelta(minutes=9)
    assert ok.last_success_at == ok.last_run_at
    assert (ok.consecutive_failures, ok.last_duration_ms, ok.last_error) == (0, 80, None)

    failing = by_id[2]
    assert (failing.last_status, failing.consecutive_failures, failing.chats) == ("failed", 3, 3)
    assert failing.last_success_at == NOW - timedelta(minutes=10)
    assert failing.last_error_kind == "unauthorized"
    assert failing.last_error is not None and CANARY not in failing.last_error
    assert "***" in failing.last_error

    never = by_id[3]
    assert (never.last_status, never.last_run_at, never.chats) == (None, None, 0)
    assert [state(by_id[i]) for i in (1, 2, 3, 4)] == ["ok", "failed", "never", "disabled"]
    assert summary(list(by_id.values())) == {
        "instances": 4,
        "ok": 1,
        "anomaly": 0,
        "failed": 1,
        "never": 1,
        "disabled": 1,
    }
    doc = json.loads(json.dumps(status_document(engine)))  # JSON-serialisable as is
    assert [i["instance_id"] for i in doc["instances"]] == [1, 2, 3, 4]
    assert doc["instances"][0]["last_run_at"] == (NOW - timedelta(minutes=9)).isoformat()
    assert CANARY not in json.dumps(doc)


# -- the chart ---------------------------------------------------------------------------------


def test_recent_runs_buckets_by_half_hour(engine: Engine) -> None:
    add_instance(engine, 1, "a")
    add_instance(engine, 2, "b")
    # NOW is 12:10, so the 48 buckets run from 12:30 yesterday to 12:30 today
    add_run(engine, 1, NOW - timedelta(minutes=5), duration_ms=100)  # 12:05, last bucket
    add_run(engine, 2, NOW - timedelta(minutes=9), duration_ms=300)  # 12:01, last bucket
    add_run(engine, 1, NOW - timedelta(minutes=11), "failed", duration_ms=2000)  # 11:59
    add_run(engine, 2, NOW - timedelta(hours=23, minutes=39), "anomaly")  # 12:31 yesterday
    add_run(engine, 1, NOW - timedelta(hours=23, minutes=41))  # 12:29 yesterday: too old
    add_run(engine, 1, NOW + timedelta(hours=1))  # clock skew: beyond the last bucket

    buckets = recent_runs(engine, now=NOW)
    assert len(buckets) == 48
    assert buckets[0].start == datetime(2026, 11, 25, 12, 30, tzinfo=UTC)
    assert buckets[-1].start == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert all(b.start.tzinfo is not None for b in buckets)
    last, before = buckets[-1], buckets[-2]
    assert last.counts == {"ok": 2, "anomaly": 0, "failed": 0}
    assert (last.avg_ms, last.max_ms) == (200, 300)
    assert before.counts == {"ok": 0, "anomaly": 0, "failed": 1}
    assert buckets[0].counts == {"ok": 0, "anomaly": 1, "failed": 0}
    assert sum(b.total for b in buckets) == 4
    assert [b.avg_ms for b in buckets[1:-2]] == [None] * 45


def test_recent_runs_cache_rereads_only_unsettled_buckets(engine: Engine) -> None:
    add_instance(engine, 1, "a")
    add_run(engine, 1, NOW - timedelta(hours=2))
    cache = RecentRuns(engine, settle=timedelta(minutes=5))
    assert sum(b.total for b in cache.get(NOW)) == 1
    # a row appearing in a settled bucket is not read again (it cannot happen for real:
    # runs are written when they end); one in the current bucket is
    add_run(engine, 1, NOW - timedelta(hours=3))
    add_run(engine, 1, NOW - timedelta(minutes=1))
    buckets = cache.get(NOW)
    assert sum(b.total for b in buckets) == 2
    fresh = recent_runs(engine, now=NOW)
    differ = [b.start for b, f in zip(buckets, fresh, strict=True) if b != f]
    assert differ == [datetime(2026, 11, 26, 9, 0, tzinfo=UTC)]  # only the planted row
    # an hour later the grid moves on by two buckets and stays consistent
    later = cache.get(NOW + timedelta(hours=1))
    assert later[-3].counts["ok"] == 1 and len(later) == 48


# -- etl status ------------------------------------------------------------------------------


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_status_command_table_and_json(engine: Engine, tmp_path: Path) -> None:
    register_secret(CANARY)
    fleet(engine)
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    args = ["status", "--config", str(config), "--database-url", _url(engine)]
    result = CliRunner().invoke(cli, args, prog_name="etl")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["instance", "label", "status"]
    # one row per instance; a failed one is followed by an indented "what to do" line
    rows_ = [line for line in lines[1:-1] if not line.startswith(" " * 14)]
    table = {int(line.split()[0]): line for line in rows_}
    assert set(table) == {1, 2, 3, 4}
    assert [line.strip() for line in lines[1:-1] if line.startswith(" " * 14)] == [
        "what to do: check the token in the Green-API console against the instance's token source"
    ]
    assert "Sales desk" in table[1] and " ok " in table[1]
    assert " failed " in table[2] and "unauthorized" in table[2] and "***" in table[2]
    assert " never " in table[3] and " disabled " in table[4]
    assert lines[-1] == ("4 instances: 1 ok, 0 anomaly, 1 failed, 1 not synced yet, 1 disabled")
    assert CANARY not in result.output

    result = CliRunner().invoke(cli, [*args, "--json"], prog_name="etl")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["summary"]["failed"] == 1
    assert {i["instance_id"]: i["consecutive_failures"] for i in doc["instances"]} == {
        1: 0,
        2: 3,
        3: 0,
        4: 0,
    }
    assert CANARY not in result.output


def test_status_command_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    args = ["status", "--config", str(config), "--database-url", url]
    result = CliRunner().invoke(cli, args, prog_name="etl")
    assert result.exit_code == 2
    assert "etl db upgrade" in result.output


# -- progress on a terminal ----------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_tty_only() -> None:
    quiet = io.StringIO()
    with ProgressLine(3, quiet) as line:
        for status in ("ok", "failed", "ok"):
            line.update(status)
    assert quiet.getvalue() == ""

    tty = FakeTTY()
    with ProgressLine(3, tty, min_interval=0) as line:
        for status in ("ok", "anomaly", "failed"):
            line.update(status)
    out = tty.getvalue()
    assert out.endswith("synced 3/3 (ok 1, anomaly 1, failed 1)\n")
    assert "\r\x1b[Ksynced 1/3 (ok 1, anomaly 0, failed 0)\r" in out
    assert out.count("\n") == 1  # one line, rewritten in place


def test_progress_line_keeps_log_lines_apart() -> None:
    tty = FakeTTY()
    handler = logging.StreamHandler(tty)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with ProgressLine(2, tty, min_interval=0) as line:
            line.update("ok")
            logging.getLogger("etl.test").warning("a log line")
            line.update("ok")
        assert handler.stream is tty  # restored
    finally:
        root.removeHandler(handler)
    out = tty.getvalue()
    # the progress line is cleared before the log line and redrawn after it
    assert "(ok 1, anomaly 0, failed 0)\r\x1b[Ka log line\n\r\x1b[Ksynced 1/2" in out
    assert out.endswith("synced 2/2 (ok 2, anomaly 0, failed 0)\n")


def test_sync_once_progress_only_when_asked_or_on_a_tty(
    tmp_path: Path, sim: Simulator, engine: Engine
) -> None:
    sim.set_fault(sim.instance_ids[2], Fault(status=401))
    config = write_config(tmp_path / "etl.toml", sim)
    base = ["sync", "--once", "--config", str(config), "--database-url", _url(engine)]
    plain = CliRunner().invoke(cli, base, prog_name="etl")  # stderr is not a terminal
    assert plain.exit_code == 1, plain.output
    assert "synced" not in plain.stderr
    forced = CliRunner().invoke(cli, [*base, "--progress"], prog_name="etl")
    assert forced.exit_code == 1, forced.output
    assert forced.stderr.rstrip("\n").endswith("synced 3/3 (ok 2, anomaly 0, failed 1)")
    assert "synced" not in forced.stdout  # the outcome table stays clean

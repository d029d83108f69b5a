"""Smoke test of benchmarks/fleet.py at tiny sizes: it runs, and its JSON lines say what
docs/benchmarks.md says they do. (compare_dlt.py needs dlt, an optional extra: not run here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "benchmarks" / "fleet.py"
INSTANCES, CHATS, TICKS = 5, 20, 2
TICK_FIELDS = {
    "type",
    "tick",
    "phase",
    "mode",
    "wall_s",
    "cpu_s",
    "sim_cpu_s",
    "http_requests",
    "rss_mb",
    "peak_rss_mb",
    "sim_rss_mb",
}
DB_FIELDS = {"db_cpu_s", "statements", "statement_rows", "rows_written", "changes", "statuses"}


def run_fleet(*args: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(FLEET), "--instances", str(INSTANCES), "--chats", str(CHATS)]
    cmd += ["--ticks", str(TICKS), "--change-rate", "0.2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def check_common(lines: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    *ticks, summary = lines
    assert summary["type"] == "summary"
    phases = ["cold"] + ["steady"] * TICKS + ["nochange"]
    assert [(t["tick"], t["phase"], t["mode"]) for t in ticks] == [
        (n, p, m) for n, p in enumerate(phases) for m in modes
    ]
    for t in ticks:
        assert t["type"] == "tick"
        assert t.keys() >= TICK_FIELDS
        assert t["instances"] == INSTANCES and t["chats"] == CHATS
        assert t["http_requests"] == INSTANCES  # one getChats per instance per pass
        assert t["wall_s"] > 0 and t["cpu_s"] > 0
        assert t["peak_rss_mb"] > 10
    return summary


def check_db(lines: list[dict[str, Any]], backend: str) -> None:
    ticks = [t for t in lines if t["type"] == "tick" and t["mode"] == "db"]
    for t in ticks:
        assert t.keys() >= DB_FIELDS
        assert t["backend"] == backend
        assert t["statuses"] == {"ok": INSTANCES}
        assert t["statements"]["total"] >= INSTANCES
        assert t["rows_written"]["sync_runs"] >= INSTANCES  # one run row per instance
        if backend == "postgresql":
            assert t["db_cpu_s"] is not None
        else:
            assert t["db_cpu_s"] is None
    cold, *steady, nochange = ticks
    assert cold["changes"]["chats_inserted"] == INSTANCES * CHATS
    assert cold["rows_written"]["chats"] == INSTANCES * CHATS
    assert cold["rows_written"]["chat_ephemeral_history"] == INSTANCES * CHATS
    for t in steady:
        c = t["changes"]
        changed = c["chats_inserted"] + c["chats_updated"] + c["chats_removed"]
        assert changed > 0
        assert t["rows_written"].get("chats", 0) == changed  # one row per changed chat
    assert nochange["rows_written"].get("chats", 0) == 0
    assert nochange["rows_written"].get("chat_ephemeral_history", 0) == 0
    assert sum(nochange["changes"][k] for k in ("chats_inserted", "chats_updated")) == 0


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_fleet_db_and_floor_side_by_side(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'bench.db'}"
    else:
        request.getfixturevalue("pg_admin")  # skips (or fails in CI) without PostgreSQL
        from tests.conftest import PG_URL

        assert PG_URL
        url = PG_URL
    lines = run_fleet("--database-url", url)
    summary = check_common(lines, ["floor", "db"])
    check_db(lines, "sqlite" if backend == "sqlite" else "postgresql")
    for phase in ("cold", "steady", "nochange"):
        assert summary[phase]["ratio_vs_floor"] > 0
        assert summary[phase]["floor_wall_s"] > 0 and summary[phase]["db_wall_s"] > 0
    assert summary["goals"]["nochange_writes_no_chat_or_history_rows"] is True
    assert summary["goals"]["every_sync_ok"] is True
    if backend == "sqlite":
        assert not (tmp_path / "bench.db").exists()  # the scratch file is removed


def test_fleet_takeover_after_a_hand_over_or_persisting_ticks(tmp_path: Path) -> None:
    """``--hand-over``: the old syncer writes its snapshots before the takeover (as `etl
    run` does when it lets instances go); ``--persist-snapshots``: every tick writes its
    own; by default (``--persist-every`` 10) the first load and every tenth tick do, and
    the new syncer tops them up from the rows written since. Any of these ways, the new
    syncer reads them instead of every row: fewer statements than the same takeover
    with none (``--persist-every 0``)."""
    statements = {}
    for how in ("--persist-every=0", "", "--hand-over", "--persist-snapshots"):
        url = f"sqlite:///{tmp_path / f'bench{how}.db'}"
        args = ["--no-floor", "--no-nochange", "--takeover", "1", "--database-url", url]
        lines = run_fleet(*args, *([how] if how else []))
        *_, takeover, summary = lines
        assert takeover["phase"] == "takeover" and takeover["statuses"] == {"ok": INSTANCES}
        assert takeover["persist_snapshots"] is (how == "--persist-snapshots")
        assert takeover["persist_every"] == (0 if how == "--persist-every=0" else 10)
        if how == "--hand-over":
            assert takeover["hand_over"]["written"] == INSTANCES
            assert summary["takeover"]["hand_over_s"] > 0
        else:
            assert "hand_over" not in takeover
        statements[how] = takeover["statements"]["total"]
    for how in ("", "--hand-over", "--persist-snapshots"):
        assert statements[how] < statements["--persist-every=0"], statements


def test_fleet_floor_only() -> None:
    lines = run_fleet("--floor")
    summary = check_common(lines, ["floor"])
    for t in lines[:-1]:
        assert "statements" not in t and "rows_written" not in t
        assert t["chats_decoded"] >= INSTANCES * CHATS * 0.8
    assert summary["steady"]["floor_wall_s"] > 0
    assert "ratio_vs_floor" not in summary["steady"]


@pytest.mark.postgres
def test_fleet_drop_foreign_keys_experiment(request: pytest.FixtureRequest) -> None:
    """``--drop-foreign-keys`` and ``--drop-change-seq-indexes`` (docs/benchmarks.md, "Cold
    start") drop exactly the seven foreign keys and the four ``change_seq`` indexes of the
    chat-level tables in the scratch database, and the sync still writes what it always
    does; db passes report their write groups."""
    request.getfixturevalue("pg_admin")
    from tests.conftest import PG_URL

    assert PG_URL
    lines = run_fleet(
        "--database-url", PG_URL, "--no-floor", "--drop-foreign-keys", "--drop-change-seq-indexes"
    )
    check_common(lines, ["db"])
    check_db(lines, "postgresql")
    assert sorted(lines[0]["dropped_foreign_keys"]) == [
        "fk_chat_ephemeral_history_chat",
        "fk_chat_ephemeral_history_sync_run_id_sync_runs",
        "fk_chat_events_instance_id_instances",
        "fk_chat_events_sync_run_id_sync_runs",
        "fk_chat_presence_chat",
        "fk_chat_presence_sync_run_id_sync_runs",
        "fk_chats_instance_id_instances",
    ]
    assert sorted(lines[0]["dropped_indexes"]) == [
        "ix_chat_ephemeral_history_change_seq",
        "ix_chat_events_change_seq",
        "ix_chat_presence_change_seq",
        "ix_chats_change_seq",
    ]
    for t in lines[:-1]:
        groups = t["write_groups"]
        assert groups["count"] >= 1 and 1 <= groups["mean_size"] <= groups["max_size"]
        assert groups["count"] * groups["mean_size"] == pytest.approx(INSTANCES, abs=0.05)


# --- process.py: whole processes -------------------------------------------------------

PROCESS = ROOT / "benchmarks" / "process.py"
PROCESS_FIELDS = {
    "type",
    "run",
    "tick",
    "phase",
    "mode",
    "first",
    "wall_s",
    "cpu_s",
    "user_s",
    "sys_s",
    "peak_rss_mb",
    "exit_code",
    "sim_cpu_s",
    "db_cpu_s",
    "http_requests",
}


def run_process_bench(*args: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(PROCESS), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_process_sync_and_floor_side_by_side(backend: str, request: pytest.FixtureRequest) -> None:
    """Whole ``etl sync --once`` processes against the floor process, pass by pass: each
    pair on the same lists, in alternating order, every sync ok, the changes where they
    belong (docs/benchmarks.md, "A fresh process")."""
    url = "sqlite://"
    if backend == "postgres":
        request.getfixturevalue("pg_admin")
        from tests.conftest import PG_URL

        assert PG_URL
        url = PG_URL
    lines = run_process_bench(
        *("--database-url", url, "--instances", str(INSTANCES), "--chats", str(CHATS)),
        *("--runs", "1", "--ticks", "2", "--nochange-ticks", "1", "--change-rate", "0.2"),
    )
    *passes, summary = lines
    phases = ["cold", "steady", "nochange"]
    assert [(p["run"], p["phase"]) for p in passes] == [
        (0, phase) for phase in ["cold", "steady", "steady", "nochange"] for _ in range(2)
    ]
    for pair in zip(passes[::2], passes[1::2], strict=True):
        assert {p["mode"] for p in pair} == {"floor", "sync"}
        assert [p["first"] for p in pair] == [True, False]
    # each phase alternates which process goes first
    assert [p["mode"] for p in passes[::2]] == ["floor", "floor", "sync", "floor"]
    for p in passes:
        assert p.keys() >= PROCESS_FIELDS
        assert p["exit_code"] == 0 and p["http_requests"] == INSTANCES
        assert p["wall_s"] > p["cpu_s"] / 4 > 0
        assert 5 < p["peak_rss_mb"] < 500  # the child's own, not this test's
        assert (p["db_cpu_s"] is None) == (backend == "sqlite" or p["mode"] == "floor")
        if p["mode"] == "floor":
            assert p["chats_decoded"] >= INSTANCES * CHATS * 0.8
            continue
        assert p["statuses"] == {"ok": INSTANCES}
        changes = p["changes"]
        if p["phase"] == "cold":
            assert changes["chats_inserted"] == changes["chats_received"] >= INSTANCES * CHATS
        elif p["phase"] == "steady":
            assert changes["chats_inserted"] + changes["chats_updated"] > 0
        else:
            assert changes["chats_inserted"] + changes["chats_updated"] == 0
    assert summary["type"] == "summary" and summary["every_sync_ok"] is True
    for phase, pairs in zip(phases, [1, 2, 1], strict=True):
        entry = summary[phase]
        assert entry["pairs"] == pairs
        assert entry["ratio_vs_floor"] > 0 and entry["sync_peak_rss_mb"] > 5


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_process_time_to_first_request(backend: str, request: pytest.FixtureRequest) -> None:
    """``--first-request``: from the spawn to the simulator's first getChats request, for
    the floor and for ``etl sync --once`` into a new and into a filled database, each kind
    going first in turn; every process is killed once it has asked."""
    url = "sqlite://"
    if backend == "postgres":
        request.getfixturevalue("pg_admin")
        from tests.conftest import PG_URL

        assert PG_URL
        url = PG_URL
    lines = run_process_bench(
        "--database-url", url, "--first-request", "--instances", "20", "--runs", "2"
    )
    setup, *runs, summary = lines
    assert setup["type"] == "setup" and setup["statuses"] == {"ok": 20}
    assert [r["kind"] for r in runs[:3]] == ["floor", "new", "registered"]
    assert [r["kind"] for r in runs[3:]] == ["new", "registered", "floor"]
    for r in runs:
        assert r["type"] == "first_request"
        assert 0 < r["first_request_s"] < 60
    for kind in ("floor", "new", "registered"):
        assert summary[kind]["runs"] == 2 and summary[kind]["missing"] == 0
        assert summary[kind]["median_s"] > 0
    assert set(summary["goals"]) == {
        "new_first_request_within_2s",
        "registered_first_request_within_2s",
    }


def test_startup_steps_until_the_first_request() -> None:
    """benchmarks/startup.py: each step of `etl sync --once`'s start-up, timed inside a fresh
    process that stops at its first request, into a new and a registered database."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--instances", "20"]
    proc = subprocess.run(
        [*cmd, "--runs", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *runs, summary = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert sorted(r["kind"] for r in runs) == ["new", "registered"]
    names = ["interpreter", "import etl.cli", "read the TOML", "validate (pydantic)"]
    names += ["resolve instances and tokens", "engine", "schema check", "register instances"]
    for r in runs:
        assert [step[0] for step in r["steps"]] == [*names, "first request"]
        ends = [end for _, _, end in r["steps"]]
        assert ends == sorted(ends) and all(b <= e for _, b, e in r["steps"])
    for kind in ("new@0", "registered@0"):
        assert summary["median_s"][kind]["first request"] > 0

"""The dbt project in analytics/dbt: ``dbt build`` (its models and every test) and ``dbt
source freshness`` pass against a PostgreSQL database the sync filled through the
simulator, with removals and returns, an instance whose chats switch to ``@lid`` ids
midway (``id_changed`` events, ``chat_aliases``) and a Telegram instance (chats with no
ephemeral history); a broken invariant makes its dbt test fail; the accepted event types
are the ones the sync writes; and the exposure names the Grafana dashboard and every
relation the dashboard reads.

dbt-core and dbt-postgres come from PyPI into a virtualenv of their own (never chatsync's
dependencies), built once per content of analytics/dbt/requirements.txt and kept under
``~/.cache/chatsync`` (or ``$CHATSYNC_DBT_VENV_CACHE``), so a second run starts at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from etl.client import GreenApiClient
from etl.db import make_engine, upgrade
from etl.models import EVENT_TYPES, Base
from etl.simulator import ChangeRates, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import check_history_invariants, rows

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "analytics" / "dbt"
REQUIREMENTS = PROJECT / "requirements.txt"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chatsync.json"


def dbt_executable() -> Path:
    """The cached virtualenv's ``dbt``, built (under a lock) when missing."""
    key = REQUIREMENTS.read_bytes() + sys.version.encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    base = Path(os.environ.get("CHATSYNC_DBT_VENV_CACHE", Path.home() / ".cache" / "chatsync"))
    base.mkdir(parents=True, exist_ok=True)
    venv = base / f"dbt-venv-{digest}"
    done = venv / ".complete"
    with open(base / f"dbt-venv-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if not done.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
                + ["--disable-pip-version-check", "-r", str(REQUIREMENTS)],
                check=True,
                timeout=900,
            )
            done.write_text(digest)
    return venv / "bin" / "dbt"


@pytest.fixture(scope="module")
def dbt_db(pg_admin: Engine) -> Iterator[tuple[Engine, dict[str, str]]]:
    """A database of its own, filled by 12 ticks of 5 simulated instances (renames,
    settings, removals and returns; one switches to LID mode midway, one is Telegram),
    ending now so that freshness holds; and the environment dbt's profile reads."""
    name = f"etl_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_admin.url.set(database=name)
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        upgrade(engine)
        _fill(engine)
        check_history_invariants(engine)
        u = make_url(url)
        env = {
            "CHATSYNC_DBT_HOST": u.host or "127.0.0.1",
            "CHATSYNC_DBT_PORT": str(u.port or 5432),
            "CHATSYNC_DBT_USER": u.username or "postgres",
            "CHATSYNC_DBT_PASSWORD": u.password or "",
            "CHATSYNC_DBT_DBNAME": name,
            "CHATSYNC_DBT_SCHEMA": "analytics",
        }
        yield engine, env
    finally:
        engine.dispose()
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


#: the instances of _fill: three WhatsApp ones, one that switches to LID mode at
#: LID_SWITCH_TICK, and a Telegram one
INSTANCES = 5
LID, TELEGRAM = 1101000004, 1101000005
LID_SWITCH_TICK = 6


def _fill(engine: Engine) -> None:
    rates = ChangeRates(
        new=0.05, rename=0.05, archive=0.05, ephemeral=0.1, removal=0.06, returns=0.4
    )
    now = datetime.now(UTC)
    ticks = 12
    clock = [now - timedelta(hours=ticks)]
    with Simulator(instances=INSTANCES, chats=40, seed=21, rates=rates) as sim:
        assert sim.instance_ids[-2:] == [LID, TELEGRAM]
        sim.set_platform(TELEGRAM, "telegram")
        instances = [
            make_instance(
                sim,
                i,
                platform="telegram" if i == TELEGRAM else "whatsapp",
                # checkWhatsapp links the switch within one tick (Green-API allows 10/s)
                link_requests_per_second=10.0,
            )
            for i in sim.instance_ids
        ]
        register_instances(engine, instances, now=clock[0])
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        try:
            syncer = Syncer(engine, client, clock=lambda: clock[0])
            for tick in range(ticks):
                clock[0] = now - timedelta(hours=ticks - 1 - tick)
                if tick == LID_SWITCH_TICK:
                    sim.set_lid_mode(LID)
                for inst in instances:
                    out = syncer.sync(inst)
                    assert out.status == "ok", (inst.id_instance, tick, out.error)
                sim.step()
        finally:
            client.close()
    back = rows(
        engine,
        "SELECT COUNT(*) FROM (SELECT 1 FROM chat_presence GROUP BY instance_id, chat_id "
        "HAVING COUNT(*) > 1) x",
    )[0][0]
    assert back > 0, "no chat came back: the data does not exercise presence"
    switched = rows(
        engine,
        "SELECT COUNT(*), COUNT(DISTINCT e.chat_id) FROM chat_events e "
        "JOIN chat_aliases a ON a.instance_id = e.instance_id AND a.chat_id = e.chat_id "
        "AND a.alias_id = e.new_value "
        "WHERE e.instance_id = :i AND e.event_type = 'id_changed'",
        i=LID,
    )[0]
    assert switched[0] >= 10, "the LID switch was not linked: no id_changed events, aliases"
    telegram = rows(
        engine,
        "SELECT COUNT(*), COUNT(h.id) FROM chats c "
        "LEFT JOIN chat_ephemeral_history h "
        "ON h.instance_id = c.instance_id AND h.chat_id = c.chat_id "
        "WHERE c.instance_id = :i",
        i=TELEGRAM,
    )[0]
    assert telegram[0] > 0 and telegram[1] == 0, telegram


def dbt(env: dict[str, str], tmp: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run dbt on the project; returns its exit code, its run_results.json and its output."""
    target = tmp / "target"
    cmd = [str(dbt_executable()), *args, "--project-dir", str(PROJECT)]
    cmd += ["--profiles-dir", str(PROJECT), "--target-path", str(target)]
    cmd += ["--log-path", str(tmp / "logs")]
    full_env = {**os.environ, **env, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600, cwd=tmp)
    results_file = target / ("sources.json" if args[0] == "source" else "run_results.json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    return done.returncode, results, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_dbt_build_passes_on_a_database_the_sync_filled(dbt_db, tmp_path):
    _, env = dbt_db
    code, results, out = dbt(env, tmp_path, "build")
    assert code == 0, out[-4000:]
    statuses = {r["unique_id"]: r["status"] for r in results["results"]}
    # the exposure is listed as a "no-op": there is nothing to build for it
    assert statuses.pop("exposure.chatsync.grafana_chatsync_overview") == "no-op"
    assert statuses and set(statuses.values()) <= {"success", "pass"}, statuses
    tests = [u for u in statuses if u.startswith("test.")]
    models = [u for u in statuses if u.startswith("model.")]
    assert len(models) == 5 and len(tests) >= 40, statuses
    assert "model.chatsync.stg_chatsync__chat_aliases" in statuses
    for singular in (
        "assert_one_open_history_row_per_chat",
        "assert_history_periods_chain",
        "assert_presence_periods_do_not_overlap",
        "assert_presence_open_while_in_the_list",
    ):
        assert f"test.chatsync.{singular}" in statuses
    # the generic tests that read what issue 12 added ran on data that has it (_fill)
    for prefix in (
        "accepted_values_stg_chatsync__chat_events_event_type",
        "unique_stg_chatsync__chat_aliases_alias_key",
        "relationships_stg_chatsync__chat_aliases_chat_key",
        "accepted_values_stg_chatsync__chats_platform",
    ):
        assert any(u.startswith(f"test.chatsync.{prefix}") for u in tests), prefix
    code, fresh, out = dbt(env, tmp_path, "source", "freshness")
    assert code == 0, out[-4000:]
    assert [r["status"] for r in fresh["results"]] == ["pass"], out[-4000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_broken_invariant_fails_its_dbt_test(dbt_db, tmp_path):
    """Two presence periods of one chat that overlap (written by hand, as no sync would)."""
    engine, env = dbt_db
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "SELECT instance_id, chat_id, valid_from FROM chat_presence "
                "WHERE valid_to IS NULL ORDER BY id LIMIT 1"
            )
        ).one()
        conn.execute(
            text(
                "INSERT INTO chat_presence (instance_id, chat_id, valid_from, valid_to) "
                "VALUES (:i, :c, :f - interval '1 hour', :f + interval '1 hour')"
            ),
            {"i": row.instance_id, "c": row.chat_id, "f": row.valid_from},
        )
    try:
        code, results, out = dbt(
            env, tmp_path, "build", "--select", "+assert_presence_periods_do_not_overlap"
        )
        assert code != 0, out[-4000:]
        statuses = {r["unique_id"]: r["status"] for r in results["results"]}
        assert statuses["test.chatsync.assert_presence_periods_do_not_overlap"] == "fail"
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM chat_presence WHERE sync_run_id IS NULL"))


@pytest.mark.slow
@pytest.mark.postgres
def test_a_history_row_for_a_telegram_chat_fails_its_dbt_test(dbt_db, tmp_path):
    """The open-row test skips Telegram and MAX chats only because they have no history:
    a history row written by hand for one fails it."""
    engine, env = dbt_db
    with engine.begin() as conn:
        chat_id = conn.execute(
            text("SELECT chat_id FROM chats WHERE instance_id = :i ORDER BY chat_id LIMIT 1"),
            {"i": TELEGRAM},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO chat_ephemeral_history "
                "(instance_id, chat_id, ephemeral_expiration, valid_from) "
                "VALUES (:i, :c, 0, now())"
            ),
            {"i": TELEGRAM, "c": chat_id},
        )
    try:
        code, results, out = dbt(
            env, tmp_path, "build", "--select", "+assert_one_open_history_row_per_chat"
        )
        assert code != 0, out[-4000:]
        statuses = {r["unique_id"]: r["status"] for r in results["results"]}
        assert statuses["test.chatsync.assert_one_open_history_row_per_chat"] == "fail"
    finally:
        with engine.begin() as conn:
            conn.execute(
                text("DELETE FROM chat_ephemeral_history WHERE instance_id = :i"), {"i": TELEGRAM}
            )


def _staging_columns() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((PROJECT / "models" / "staging" / "_staging.yml").read_text())
    return {f"{m['name']}.{c['name']}": c for m in doc["models"] for c in m.get("columns", [])}


def test_the_accepted_event_types_are_the_ones_the_sync_writes():
    (column_tests,) = [
        t["accepted_values"]
        for t in _staging_columns()["stg_chatsync__chat_events.event_type"]["data_tests"]
        if isinstance(t, dict) and "accepted_values" in t
    ]
    assert column_tests["arguments"]["values"] == list(EVENT_TYPES)


def test_every_table_with_a_load_cursor_is_a_source_with_a_staging_model():
    """Every table that changes (it has ``change_seq``) is a source, and the ones analysts
    read have a staging model; sync_runs' freshness is the load cursor's."""
    with_cursor = {t.name for t in Base.metadata.sorted_tables if "change_seq" in t.c}
    (source,) = yaml.safe_load((PROJECT / "models" / "sources.yml").read_text())["sources"]
    tables = {t["name"]: t for t in source["tables"]}
    assert with_cursor <= set(tables), with_cursor - set(tables)
    staged = {p.stem for p in (PROJECT / "models" / "staging").glob("stg_chatsync__*.sql")}
    for table in with_cursor - {"instances", "sync_runs"}:
        name = table.replace("chat_ephemeral_", "ephemeral_")
        assert f"stg_chatsync__{name}" in staged, table
    fresh = {n for n, t in tables.items() if "freshness" in t.get("config", {})}
    assert fresh == {"sync_runs"}
    assert "change_seq <" in tables["sync_runs"]["config"]["freshness"]["filter"]


def test_the_exposure_names_the_grafana_dashboard_and_what_it_reads():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (exposure,) = yaml.safe_load((PROJECT / "models" / "exposures.yml").read_text())["exposures"]
    assert exposure["type"] == "dashboard"
    assert exposure["url"].endswith(f"/d/{dashboard['uid']}")
    assert "deploy/grafana/dashboards/chatsync.json" in " ".join(exposure["description"].split())
    depends = {
        re.fullmatch(r"source\('chatsync', '(\w+)'\)", d).group(1) for d in exposure["depends_on"]
    }  # type: ignore[union-attr]
    read = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            read |= set(re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)", target["rawSql"]))
    assert read - {"days"} == depends
    sources = yaml.safe_load((PROJECT / "models" / "sources.yml").read_text())["sources"]
    assert depends <= {t["name"] for t in sources[0]["tables"]}

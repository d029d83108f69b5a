"""The dbt project in analytics/dbt: ``dbt build`` (its models and every test) and ``dbt
source freshness`` pass against a PostgreSQL database the sync filled through the
simulator, with removals and returns; a broken invariant makes its dbt test fail; and the
exposure names the Grafana dashboard and every relation the dashboard reads.

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
    """A database of its own, filled by 12 ticks of 3 simulated instances (renames,
    settings, removals and returns), ending now so that freshness holds; and the
    environment dbt's profile reads."""
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


def _fill(engine: Engine) -> None:
    rates = ChangeRates(
        new=0.05, rename=0.05, archive=0.05, ephemeral=0.1, removal=0.06, returns=0.4
    )
    now = datetime.now(UTC)
    ticks = 12
    clock = [now - timedelta(hours=ticks)]
    with Simulator(instances=3, chats=40, seed=21, rates=rates) as sim:
        instances = [make_instance(sim, i) for i in sim.instance_ids]
        register_instances(engine, instances, now=clock[0])
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        try:
            syncer = Syncer(engine, client, clock=lambda: clock[0])
            for tick in range(ticks):
                clock[0] = now - timedelta(hours=ticks - 1 - tick)
                for inst in instances:
                    assert syncer.sync(inst).status == "ok"
                sim.step()
        finally:
            client.close()
    back = rows(
        engine,
        "SELECT COUNT(*) FROM (SELECT 1 FROM chat_presence GROUP BY instance_id, chat_id "
        "HAVING COUNT(*) > 1) x",
    )[0][0]
    assert back > 0, "no chat came back: the data does not exercise presence"


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
    assert len(models) == 4 and len(tests) >= 30, statuses
    for singular in (
        "assert_one_open_history_row_per_chat",
        "assert_history_periods_chain",
        "assert_presence_periods_do_not_overlap",
        "assert_presence_open_while_in_the_list",
    ):
        assert f"test.chatsync.{singular}" in statuses
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

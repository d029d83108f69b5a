"""The Grafana provisioning and dashboard in deploy/grafana: the files are consistent, every
panel uses the provisioned datasource, and every panel's SQL runs on PostgreSQL (after the
Grafana macros it uses are expanded) against simulator data and returns the shape its panel
needs. PostgreSQL only: Grafana reads the production database.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from etl.client import GreenApiClient
from etl.db import make_engine, upgrade
from etl.models import EVENT_TYPES, SYNC_STATUSES
from etl.simulator import ChangeRates, Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import check_history_invariants, scalar

pytestmark = pytest.mark.postgres

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DATASOURCE_YML = GRAFANA / "provisioning" / "datasources" / "postgres.yml"
DASHBOARDS_YML = GRAFANA / "provisioning" / "dashboards" / "chatsync.yml"
DASHBOARD_JSON = GRAFANA / "dashboards" / "chatsync.json"
PG_SESSION_TZ = "America/St_Johns"  # UTC-03:30 (-02:30 in summer): non-UTC buckets show up
SETTINGS = {"off", "24 hours", "7 days", "90 days"}


def yaml_scalars(path: Path) -> dict[str, list[str]]:
    """``key: value`` pairs of a small YAML file, nesting ignored (no YAML library needed)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\s*(?:-\s+)?([A-Za-z_]\w*):\s*(\S.*?)?\s*", line)
        if m and m.group(2) is not None and not line.lstrip().startswith("#"):
            found.setdefault(m.group(1), []).append(m.group(2).strip("'\""))
    return found


def one(values: dict[str, list[str]], key: str) -> str:
    assert len(values.get(key, [])) == 1, f"{key}: {values.get(key)}"
    return values[key][0]


DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]


# -- the Grafana macros this dashboard uses --------------------------------------------------


def grafana_time(dt: datetime) -> str:
    """How Grafana's PostgreSQL datasource renders a time in a macro: '2026-06-01T00:00:00Z'."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand_macros(sql: str, time_from: datetime, time_to: datetime) -> str:
    """Expand exactly the macros the dashboard uses, as Grafana does for PostgreSQL.

    ``$__timeFilter(col)`` -> ``col BETWEEN '<from>' AND '<to>'``;
    ``$__timeFrom()`` / ``$__timeTo()`` -> ``'<from>'`` / ``'<to>'``. Anything else that
    looks like a macro or a template variable is an error.
    """
    f, t = grafana_time(time_from), grafana_time(time_to)
    sql = re.sub(
        r"\$__timeFilter\(\s*([\w.\"]+)\s*\)",
        lambda m: f"{m.group(1)} BETWEEN '{f}' AND '{t}'",
        sql,
    )
    sql = sql.replace("$__timeFrom()", f"'{f}'").replace("$__timeTo()", f"'{t}'")
    left = re.findall(r"\$__\w+|\$\{?\w+", sql)
    assert not left, f"unexpanded Grafana macros or variables: {left}"
    return sql


def test_expander_refuses_what_it_does_not_know():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    got = expand_macros("x WHERE $__timeFilter(r.started_at) AND $__timeTo()", now, now)
    assert got == (
        "x WHERE r.started_at BETWEEN '2026-06-01T00:00:00Z' AND '2026-06-01T00:00:00Z' "
        "AND '2026-06-01T00:00:00Z'"
    )
    for sql in ("$__timeGroupAlias(t, '1h')", "$__interval", "WHERE id IN ($instance)"):
        with pytest.raises(AssertionError, match="unexpanded"):
            expand_macros(sql, now, now)


# -- static checks -------------------------------------------------------------------------


def test_datasource_provisioning():
    ds = yaml_scalars(DATASOURCE_YML)
    assert one(ds, "apiVersion") == "1"
    assert one(ds, "name") == "chatsync"
    assert one(ds, "type") == "grafana-postgresql-datasource"
    assert one(ds, "url") == "postgres:5432"
    assert one(ds, "user") == "etl"
    assert one(ds, "database") == "etl"
    assert one(ds, "password") == "etl"
    assert one(ds, "sslmode") == "disable"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", one(ds, "uid"))
    assert "secureJsonData" in DATASOURCE_YML.read_text(encoding="utf-8")


def test_dashboard_provisioning():
    prov = yaml_scalars(DASHBOARDS_YML)
    assert one(prov, "apiVersion") == "1"
    assert one(prov, "type") == "file"
    assert one(prov, "path") == "/var/lib/grafana/dashboards"
    assert sorted(p.name for p in DASHBOARD_JSON.parent.glob("*.json")) == ["chatsync.json"]


def test_dashboard_json_is_well_formed():
    d = DASHBOARD
    assert d["uid"] == "chatsync-overview" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    assert d["timezone"] == "utc", "the SQL buckets days and hours in UTC"
    assert d["templating"]["list"] == [], "the macro expander knows no template variables"
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    for p in PANELS:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        assert p["type"] in {"timeseries", "table", "piechart", "barchart"}, p["title"]
        assert p.get("description"), p["title"]
        (target,) = p["targets"]
        assert target["rawQuery"] is True and target["editorMode"] == "code"
        want = "time_series" if p["type"] == "timeseries" else "table"
        assert target["format"] == want, p["title"]
    # the panels the dashboard promises
    kinds = {p["title"]: p["type"] for p in PANELS}
    assert kinds == {title: spec.kind for title, spec in SPECS.items()}


def test_every_panel_uses_the_provisioned_datasource():
    ds = yaml_scalars(DATASOURCE_YML)
    uid, kind = one(ds, "uid"), one(ds, "type")
    for p in PANELS:
        assert p["datasource"] == {"type": kind, "uid": uid}, p["title"]
        for target in p["targets"]:
            assert target["datasource"] == {"type": kind, "uid": uid}, p["title"]


# -- every panel's SQL against PostgreSQL with simulator data ---------------------------------


@dataclass
class GrafanaData:
    engine: Engine
    time_from: datetime
    time_to: datetime
    failing: int  # an instance whose latest syncs failed
    first_sync: datetime  # the clock of the first sync (no chat is in any list before it)


def build_simulator_data(engine: Engine) -> GrafanaData:
    """Five days of a 3-instance simulator, synced every 6 hours, with a few faults."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=5)
    rates = ChangeRates(
        new=0.05, rename=0.05, archive=0.05, ephemeral=0.1, removal=0.02, returns=0.3
    )
    clock_now = [start]
    with Simulator(
        instances=3, chats=40, seed=5, rates=rates, start_time=int(start.timestamp())
    ) as sim:
        instances = [make_instance(sim, i) for i in sim.instance_ids]
        register_instances(engine, instances, now=start)
        first, second, third = (i.id_instance for i in instances)
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        try:
            syncer = Syncer(engine, client, clock=lambda: clock_now[0])
            for tick in range(20):
                clock_now[0] = start + timedelta(hours=6 * tick)
                sim.set_fault(second, Fault(status=401) if tick in (7, 8) else None)
                sim.set_fault(first, Fault(mode="empty") if tick == 12 else None)
                sim.set_fault(third, Fault(status=403) if tick >= 18 else None)
                for inst in instances:
                    syncer.sync(inst)
                sim.step()
        finally:
            client.close()
    return GrafanaData(engine, start - timedelta(days=1), now, third, start)


@pytest.fixture(scope="module")
def grafana_db(pg_admin: Engine) -> Iterator[GrafanaData]:
    """A PostgreSQL database with simulator data, its session in a non-UTC time zone."""
    name = f"etl_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = (
        pg_admin.url.set(database=name)
        .update_query_dict({"options": f"-c timezone={PG_SESSION_TZ}"})
        .render_as_string(hide_password=False)
    )
    engine = make_engine(url)
    try:
        upgrade(engine)
        data = build_simulator_data(engine)
        check_history_invariants(engine)
        yield data
    finally:
        engine.dispose()
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class PanelSpec:
    kind: str
    columns: list[str]
    check: Callable[[list[dict[str, Any]], GrafanaData], None]


def _series(rows: list[dict[str, Any]], data: GrafanaData, metrics: set[str]) -> None:
    """A long-format time series: time (aware, ascending, in range), metric, value > 0."""
    times = [r["time"] for r in rows]
    assert all(isinstance(t, datetime) and t.tzinfo is not None for t in times)
    assert times == sorted(times), "Grafana needs the rows ordered by time"
    assert data.time_from - timedelta(days=1) <= times[0] and times[-1] <= data.time_to
    assert {r["metric"] for r in rows} <= metrics
    assert all(isinstance(r["value"], int) and r["value"] > 0 for r in rows)
    assert len({(r["time"], r["metric"]) for r in rows}) == len(rows), "one point per series"


def _in_range(data: GrafanaData, table: str, column: str) -> int:
    return int(
        scalar(
            data.engine,
            f"SELECT COUNT(*) FROM {table} WHERE {column} BETWEEN :f AND :t",
            f=data.time_from,
            t=data.time_to,
        )
    )


def check_adoption(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    _series(rows, data, SETTINGS)
    days = sorted({r["time"].astimezone(UTC) for r in rows})
    assert all((d.hour, d.minute) == (0, 0) for d in days), "points at UTC midnights"
    # one point per UTC day from the first sync's on, today included (before it, no chat
    # was in any list, even those whose setting is older)
    assert [d.date() for d in days] == [
        data.first_sync.date() + timedelta(days=n)
        for n in range((data.time_to.date() - data.first_sync.date()).days + 1)
    ]
    # today's point counts every chat in the list now once, and no removed one
    today = [r for r in rows if r["time"] == days[-1]]
    present = scalar(data.engine, "SELECT COUNT(*) FROM chats_current")
    assert sum(r["value"] for r in today) == present
    assert present < scalar(data.engine, "SELECT COUNT(*) FROM chats"), "no chat was removed"
    assert {r["metric"] for r in today} >= {"off", "7 days"}
    # every day's point counts the chats in the list at its end, from the presence periods
    for day in days:
        end = day + timedelta(days=1)
        in_list = scalar(
            data.engine,
            "SELECT COUNT(*) FROM chat_presence WHERE valid_from < :e "
            "AND (valid_to IS NULL OR valid_to >= :e)",
            e=end,
        )
        assert sum(r["value"] for r in rows if r["time"] == day) == in_list, day
    returned = scalar(
        data.engine,
        "SELECT COUNT(*) FROM (SELECT chat_id FROM chat_presence "
        "GROUP BY instance_id, chat_id HAVING COUNT(*) > 1) x",
    )
    assert returned > 0, "no chat came back: the data set does not test absences"


def check_changes(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    _series(rows, data, set(EVENT_TYPES))
    assert {"created", "renamed", "ephemeral_changed", "removed"} <= {r["metric"] for r in rows}
    assert sum(r["value"] for r in rows) == _in_range(data, "chat_events", "occurred_at")
    for r in rows:
        assert r["time"].astimezone(UTC).hour == 0


def check_types(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    assert {r["metric"] for r in rows} >= {"user", "group"}
    assert sum(r["value"] for r in rows) == scalar(
        data.engine, "SELECT COUNT(*) FROM chats_current"
    )


def check_outcomes(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    _series(rows, data, set(SYNC_STATUSES))
    assert {r["metric"] for r in rows} == set(SYNC_STATUSES)
    assert sum(r["value"] for r in rows) == _in_range(data, "sync_runs", "started_at") == 60
    for r in rows:
        assert r["time"].astimezone(UTC).minute == 0


def check_health(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    assert len(rows) == 3
    assert rows[0]["instance_id"] == data.failing and rows[0]["last_status"] == "failed"
    assert rows[0]["consecutive_failures"] == 2
    assert [r["last_status"] for r in rows[1:]] == ["ok", "ok"]
    assert all(0.0 <= r["success_ratio_24h"] <= 1.0 for r in rows)


def check_problems(rows: list[dict[str, Any]], data: GrafanaData) -> None:
    got = {(r["status"], r["error_kind"]): r["runs"] for r in rows}
    assert got == {
        ("failed", "unauthorized"): 2,
        ("failed", "forbidden"): 2,
        ("anomaly", "empty_response"): 1,
    }
    assert all(isinstance(r["last_at"], datetime) for r in rows)


SPECS: dict[str, PanelSpec] = {
    "Disappearing messages: chats per setting": PanelSpec(
        "timeseries", ["time", "metric", "value"], check_adoption
    ),
    "Chat changes per day": PanelSpec("timeseries", ["time", "metric", "value"], check_changes),
    "Chats by type": PanelSpec("piechart", ["metric", "value"], check_types),
    "Sync outcomes per hour": PanelSpec("timeseries", ["time", "metric", "value"], check_outcomes),
    "Sync health": PanelSpec(
        "table",
        [
            "instance",
            "instance_id",
            "enabled",
            "last_status",
            "last_run_at",
            "last_success_at",
            "consecutive_failures",
            "runs_24h",
            "success_ratio_24h",
        ],
        check_health,
    ),
    "Failures and anomalies by kind": PanelSpec(
        "table",
        ["instance", "instance_id", "status", "error_kind", "runs", "last_at"],
        check_problems,
    ),
}


@pytest.mark.parametrize("title", [p["title"] for p in PANELS])
def test_panel_sql_runs_and_has_the_right_shape(grafana_db, title):
    assert title in SPECS, f"panel {title!r} has no expectations in tests/test_grafana.py"
    spec = SPECS[title]
    (panel,) = (p for p in PANELS if p["title"] == title)
    sql = expand_macros(panel["targets"][0]["rawSql"], grafana_db.time_from, grafana_db.time_to)
    with grafana_db.engine.connect() as conn:
        result = conn.exec_driver_sql(sql)
        columns = list(result.keys())
        rows = [dict(r._mapping) for r in result]
    assert columns == spec.columns
    assert rows, f"{title}: no rows"
    spec.check(rows, grafana_db)


def test_time_range_filters_apply(grafana_db):
    """A range before any data gives empty time series (the filters are really there)."""
    past_to = grafana_db.time_from - timedelta(days=30)
    past_from = past_to - timedelta(days=1)
    for p in PANELS:
        sql = expand_macros(p["targets"][0]["rawSql"], past_from, past_to)
        with grafana_db.engine.connect() as conn:
            got = list(conn.exec_driver_sql(sql))
        if p["title"] in ("Chat changes per day", "Sync outcomes per hour"):
            assert got == [], p["title"]
        if p["title"] == "Failures and anomalies by kind":
            assert got == [], p["title"]

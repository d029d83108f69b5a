"""Incremental loads (docs/queries.md#incremental-loads): the documented query of each table,
run again and again while several writers commit, ends with every row exactly once, on
SQLite and PostgreSQL; and on PostgreSQL, two transactions that commit in the other order
than they started, the case a cursor on an id or a timestamp gets wrong.

The queries are the blocks of docs/queries.md, parsed as tests/test_bi.py parses them.
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, text

from etl.client import GreenApiClient
from etl.db import make_engine, read_only
from etl.models import CURSOR_TABLES
from etl.simulator import ChangeRates, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.test_bi import QUERIES_MD, query_for

#: the primary key of each table with a cursor (the merge key of a copy)
KEYS = {
    "chats": ("instance_id", "chat_id"),
    "chat_aliases": ("instance_id", "alias_id"),
    "chat_ephemeral_history": ("id",),
    "chat_presence": ("id",),
    "chat_events": ("id",),
    "sync_runs": ("id",),
    "instances": ("id_instance",),
}
#: tables whose rows never change once committed: each must arrive exactly once
APPEND_ONLY = {"chat_events", "sync_runs"}


def test_every_table_with_a_cursor_has_a_documented_query() -> None:
    assert set(KEYS) == {t.name for t in CURSOR_TABLES}
    for table in KEYS:
        for dialect in ("sqlite", "postgresql"):
            assert "load_watermark" in query_for(f"incremental_{table}", dialect).sql


def test_the_key_table_and_the_dlt_recipe_name_every_table_with_a_cursor() -> None:
    """docs/queries.md's merge-key table and its dlt recipe (Python, not run here: it
    needs dlt) list every table with a cursor, with its primary key and append or merge."""
    doc = QUERIES_MD.read_text(encoding="utf-8")
    section = doc.split("## Incremental loads", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            keys = tuple(k.strip(" `") for k in cells[1].split(","))
            table[cells[0].strip("`")] = (keys, cells[3])
    assert table == {
        t: (keys, "append" if t in APPEND_ONLY else "merge") for t, keys in KEYS.items()
    }
    (recipe,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    tree = ast.parse(recipe)
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("KEYS", "APPEND")
    }
    (loop,) = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    names = ast.literal_eval(loop.iter)
    assert sorted(names) == sorted(KEYS)
    assert {n: tuple(assigned["KEYS"].get(n, ("id",))) for n in names} == KEYS
    assert assigned["APPEND"] == APPEND_ONLY


class Loader:
    """A downstream copy kept with the documented incremental queries: one cursor per
    table, rows merged by primary key, every delivery counted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        self.sql = {t: text(query_for(f"incremental_{t}", dialect).sql) for t in KEYS}
        self.last = dict.fromkeys(KEYS, 0)
        self.copy: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {t: {} for t in KEYS}
        self.delivered: dict[str, Counter[tuple[Any, ...]]] = {t: Counter() for t in KEYS}
        self.passes = 0

    def load(self) -> int:
        """One pass over every table; returns how many rows arrived."""
        got = 0
        with read_only(self.engine) as conn:  # on SQLite: no write lock for the reader
            for table, keys in KEYS.items():
                rows = conn.execute(self.sql[table], {"last": self.last[table]}).mappings()
                for row in rows:
                    key = tuple(row[k] for k in keys)
                    self.delivered[table][(*key, row["change_seq"])] += 1
                    self.copy[table][key] = dict(row)
                    self.last[table] = max(self.last[table], row["change_seq"])
                    got += 1
        self.passes += 1
        return got


def table_rows(engine: Engine, table: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = KEYS[table]
    with engine.connect() as conn:
        result = conn.execute(text(f"SELECT * FROM {table}")).mappings()  # noqa: S608
        return {tuple(r[k] for k in keys): dict(r) for r in result}


def wait_for_watermark(engine: Engine, timeout: float = 60) -> None:
    """Until every row is below the watermark: on PostgreSQL a transaction left open
    elsewhere on the server (another test run) holds it back; here nothing else writes."""
    top = " UNION ALL ".join(f"SELECT MAX(change_seq) AS m FROM {t}" for t in KEYS)
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            highest = conn.execute(text(f"SELECT MAX(m) FROM ({top}) x")).scalar_one()  # noqa: S608
            mark = conn.execute(text("SELECT watermark FROM load_watermark")).scalar_one()
        if highest is None or mark > highest:
            return
        assert time.monotonic() < deadline, f"watermark {mark} never passed {highest}"
        time.sleep(0.2)


def check_copy(loader: Loader, engine: Engine) -> None:
    """The copy is the tables, and nothing arrived twice."""
    for table in KEYS:
        twice = [k for k, n in loader.delivered[table].items() if n > 1]
        assert twice == [], f"{table}: delivered more than once: {twice[:5]}"
        actual = table_rows(engine, table)
        missing = actual.keys() - loader.copy[table].keys()
        assert not missing, (
            f"{table}: {len(missing)} rows never arrived, e.g. {sorted(missing)[:3]}"
        )
        assert loader.copy[table] == actual, f"{table}: the copy differs from the table"
        if table in APPEND_ONLY:
            assert len(loader.delivered[table]) == len(actual), f"{table}: a row arrived twice"


def test_loads_run_while_replicas_commit_end_with_every_row_once(migrated_db_url: str) -> None:
    """Two "replicas" (a Syncer and an engine each) with group commit, two threads each,
    write ticks of eight simulated instances that change a lot (new chats, renames,
    settings, removals, returns), one instance shared by both, while a loader runs the
    documented queries in a loop; then one last pass. Bounded by the number of ticks."""
    rates = ChangeRates(
        new=0.04, rename=0.1, archive=0.05, ephemeral=0.15, removal=0.08, returns=0.4
    )
    engines = [make_engine(migrated_db_url), make_engine(migrated_db_url)]
    clients = [GreenApiClient(backoff_initial=0.01, backoff_max=0.05) for _ in engines]
    loader = Loader(engines[0])
    try:
        with Simulator(instances=8, chats=25, seed=13, rates=rates) as sim:
            instances = [make_instance(sim, i) for i in sim.instance_ids]
            register_instances(engines[0], instances)
            syncers = [Syncer(e, c) for e, c in zip(engines, clients, strict=True)]
            shares = [instances[:5], instances[4:]]  # instances[4] is synced by both
            errors: list[BaseException] = []

            def write(syncer: Syncer, mine: list[Any], rounds: int) -> None:
                try:
                    for _ in range(rounds):
                        for inst in mine:
                            syncer.sync(inst)
                        sim.step()
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [
                threading.Thread(target=write, args=(syncer, share[k::2], 12))
                for syncer, share in zip(syncers, shares, strict=True)
                for k in range(2)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                loader.load()
            for t in threads:
                t.join()
            assert not errors, errors
        wait_for_watermark(engines[0])
        loader.load()  # the last pass, once every writer has committed
        check_copy(loader, engines[0])
        runs = table_rows(engines[0], "sync_runs")
        assert len(runs) >= 8 * 12 and {r["status"] for r in runs.values()} <= {"ok", "anomaly"}
        assert loader.passes > 3, "the loader never ran while the writers did"
        removed = sum(1 for r in table_rows(engines[0], "chat_presence").values() if r["valid_to"])
        assert removed > 0, "no chat left a list: the data does not change enough"
    finally:
        for c in clients:
            c.close()
        for e in engines:
            e.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_transaction_that_commits_late_is_not_skipped(engine: Engine) -> None:
    """A takes its id first, B second; B commits, a load runs, then A commits. A cursor on
    ``id`` has passed A's id by then and never returns A's row; the documented query holds
    both back until A has ended, then returns both."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (id_instance, label, api_url, enabled, created_at, "
                "updated_at) VALUES (1, 'x', 'http://127.0.0.1', true, now(), now())"
            )
        )
    loader = Loader(engine)
    loader.load()
    event = (
        "INSERT INTO chat_events (instance_id, chat_id, event_type, occurred_at) "
        "VALUES (1, :c, 'created', now()) RETURNING id"
    )
    naive_last, naive_rows = 0, []

    def naive() -> None:
        nonlocal naive_last
        with engine.connect() as conn:
            got = conn.execute(
                text("SELECT id FROM chat_events WHERE id > :l ORDER BY id"), {"l": naive_last}
            ).all()
        naive_rows.extend(r[0] for r in got)
        naive_last = max([naive_last, *naive_rows])

    with engine.connect() as a, engine.connect() as b:
        a_id = a.execute(text(event), {"c": "a@c.us"}).scalar_one()
        b_id = b.execute(text(event), {"c": "b@c.us"}).scalar_one()
        assert a_id < b_id
        b.commit()
        naive()
        loader.load()
        assert naive_rows == [b_id]
        assert loader.copy["chat_events"] == {}, "a row above the watermark came out"
        a.commit()
    naive()
    wait_for_watermark(engine)
    loader.load()
    assert naive_rows == [b_id], "the id cursor never sees A's row"
    assert set(loader.copy["chat_events"]) == {(a_id,), (b_id,)}
    check_copy(loader, engine)

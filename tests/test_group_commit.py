"""Group commit: ticks that queue up behind a write are written together in one
transaction, with the same result as one by one, and one bad tick still fails alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, event

from etl.client import GreenApiClient
from etl.simulator import Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import chats_list, check_history_invariants, rows, scalar

INSTANCES = 24


@pytest.fixture
def fleet() -> Iterator[Simulator]:
    with Simulator(instances=INSTANCES, chats=10, seed=11) as s:
        yield s


def slow_transactions(engine: Engine, seconds: float = 0.03) -> None:
    """Every transaction starts late, so that ticks queue up behind the writers."""

    @event.listens_for(engine, "begin")
    def _slow(conn: Any) -> None:
        time.sleep(seconds)


def tick(syncer: Syncer, instances: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(syncer.sync, instances))


def test_queued_ticks_are_written_in_groups_with_the_same_result_as_one_by_one(
    fleet: Simulator, engine: Engine, fast_client: GreenApiClient
) -> None:
    instances = [make_instance(fleet, iid) for iid in fleet.instance_ids]
    register_instances(engine, instances)
    slow_transactions(engine)
    syncer = Syncer(engine, fast_client)
    expected: dict[tuple[int, str], str] = {}
    for n in range(3):
        for k, iid in enumerate(fleet.instance_ids):
            chats = chats_list(20 + k)
            for i, c in enumerate(chats):
                if (i + n) % 3 == 0:
                    c["name"] = f"{c['name']} v{n}"
                if n and i % 7 == 0:
                    c["ephemeralExpiration"] = 3600 * (n + 1)
                    c["ephemeralSettingTimestamp"] = 1_777_000_000 + n
            fleet.set_chats(iid, chats)
            expected.update({(iid, c["id"]): c["name"] for c in chats})
        outcomes = tick(syncer, instances)
        assert [o.status for o in outcomes] == ["ok"] * INSTANCES, outcomes
    assert max(syncer.group_sizes) > 1, syncer.group_sizes
    assert sum(k * v for k, v in syncer.group_sizes.items()) == 3 * INSTANCES
    got = {(r.instance_id, r.chat_id): r.name for r in rows(engine, "SELECT * FROM chats")}
    assert got == expected
    assert scalar(engine, "SELECT COUNT(*) FROM sync_runs WHERE status = 'ok'") == 3 * INSTANCES
    check_history_invariants(engine)
    # each tick of a group has its own run row and counts
    for k, iid in enumerate(fleet.instance_ids):
        counts = rows(
            engine,
            "SELECT chats_inserted, chats_updated FROM sync_runs WHERE instance_id = :i "
            "ORDER BY started_at",
            i=iid,
        )
        updated = [
            sum(1 for i in range(20 + k) if (i + n - 1) % 3 == 0 or (i + n) % 3 == 0 or i % 7 == 0)
            for n in (1, 2)
        ]
        assert [tuple(r) for r in counts] == [(20 + k, 0), (0, updated[0]), (0, updated[1])]


def test_one_tick_the_database_rejects_fails_alone_in_its_group(
    fleet: Simulator, engine: Engine, fast_client: GreenApiClient
) -> None:
    instances = [make_instance(fleet, iid) for iid in fleet.instance_ids]
    register_instances(engine, instances)
    if engine.dialect.name == "postgresql":
        ddl = [
            "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN IF NEW.name = 'boom' THEN "
            "RAISE EXCEPTION 'rejected by a trigger'; END IF; RETURN NEW; END $$ "
            "LANGUAGE plpgsql",
            "CREATE TRIGGER boom BEFORE INSERT OR UPDATE ON chats FOR EACH ROW "
            "EXECUTE FUNCTION boom()",
        ]
    else:
        ddl = [
            "CREATE TRIGGER boom BEFORE UPDATE ON chats WHEN NEW.name = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'rejected by a trigger'); END"
        ]
    with engine.begin() as conn:
        for sql in ddl:
            conn.exec_driver_sql(sql)
    syncer = Syncer(engine, fast_client)
    for iid in fleet.instance_ids:
        fleet.set_chats(iid, chats_list(30))
    assert {o.status for o in tick(syncer, instances)} == {"ok"}
    slow_transactions(engine)
    poisoned = fleet.instance_ids[5]
    for iid in fleet.instance_ids:
        chats = chats_list(30)
        chats[3]["name"] = "boom" if iid == poisoned else "renamed"
        fleet.set_chats(iid, chats)
    outcomes = {o.instance_id: o for o in tick(syncer, instances)}
    assert max(syncer.group_sizes) > 1, syncer.group_sizes
    bad = outcomes.pop(poisoned)
    assert (bad.status, bad.error_kind) == ("failed", "database"), bad
    assert "rejected by a trigger" in (bad.error or "")
    assert {(o.status, o.chats_updated) for o in outcomes.values()} == {("ok", 1)}
    names = dict(
        (r.instance_id, r.name)
        for r in rows(
            engine, "SELECT instance_id, name FROM chats WHERE chat_id = :c", c="79000000003@c.us"
        )
    )
    assert names.pop(poisoned) == "Chat 3"  # untouched
    assert set(names.values()) == {"renamed"}
    runs = rows(
        engine,
        "SELECT status, error_kind FROM sync_runs WHERE instance_id = :i ORDER BY started_at",
        i=poisoned,
    )
    assert [tuple(r) for r in runs] == [("ok", None), ("failed", "database")]
    check_history_invariants(engine)

"""The BI surface on SQLite and PostgreSQL: ``chat_events`` semantics, the three views, and
every query of ``docs/queries.md`` (parsed out of the markdown, run on its dialect(s) against
known data, its result checked). A query in the docs without a check here fails the suite,
and so does a check without a query, so the docs and the tests cannot drift apart.

The shared data set is built once per backend (module scope) with a controlled clock that
starts six days before the real now, so the views' and queries' windows relative to the
database's ``now()`` (24 hours, 30 days) see it. The PostgreSQL session runs in a non-UTC
time zone on purpose: every day/hour bucket must still be a UTC one.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text

from etl.client import GreenApiClient
from etl.db import make_engine, upgrade
from etl.models import Base
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances
from tests.conftest import make_instance
from tests.factories import chat, chats_list, check_history_invariants, rows, scalar

ROOT = Path(__file__).resolve().parent.parent
QUERIES_MD = ROOT / "docs" / "queries.md"
SCHEMA_MD = ROOT / "docs" / "schema.md"
PG_SESSION_TZ = "Pacific/Marquesas"  # UTC-09:30: day/hour buckets not done in UTC show up
LABELS = {0: "off", 86400: "24 hours", 604800: "7 days", 7776000: "90 days"}


class Clock:
    """A controllable UTC clock for the syncer."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 60) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def ts(dt: datetime) -> int:
    return int(dt.timestamp())


def as_utc(value: Any) -> datetime | None:
    """A timestamp from either backend (aware datetime, naive UTC datetime, UTC text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_day(value: Any) -> str:
    """A day from either backend (``date`` on PostgreSQL, ``'YYYY-MM-DD'`` on SQLite)."""
    if isinstance(value, datetime):
        raise AssertionError(f"expected a date, got a timestamp {value!r}")
    if isinstance(value, date):
        return value.isoformat()
    assert isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", value), value
    return value


def dicts(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in rows(engine, sql, **params)]


def events_of(engine: Engine, run_id: int | None = None) -> list[tuple[Any, ...]]:
    sql = (
        "SELECT chat_id, event_type, old_value, new_value, occurred_at, sync_run_id "
        "FROM chat_events"
    )
    if run_id is not None:
        sql += " WHERE sync_run_id = :r"
    got = rows(engine, sql + " ORDER BY id", **({"r": run_id} if run_id is not None else {}))
    return [(r[0], r[1], r[2], r[3], as_utc(r[4]), r[5]) for r in got]


def event_count(engine: Engine) -> int:
    return int(rows(engine, "SELECT COUNT(*) FROM chat_events")[0][0])


# ---------------------------------------------------------------------------------------
# chat_events semantics, on a fresh database per test
# ---------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))


@pytest.fixture
def csyncer(engine: Engine, fast_client: GreenApiClient, clock: Clock) -> Syncer:
    return Syncer(engine, fast_client, clock=clock)


@pytest.fixture
def inst(sim: Simulator, engine: Engine):  # type: ignore[no-untyped-def]
    instance = make_instance(sim)
    register_instances(engine, [instance])
    return instance


def test_every_event_type_with_values_time_and_run(sim, engine, csyncer, inst, clock):
    iid = inst.id_instance
    first_stamp = clock.now - timedelta(days=3)
    sim.set_chats(
        iid,
        [
            chat("1@c.us", name="One"),
            chat("2-3@g.us", name="Two", kind="group"),
            chat("3@c.us", name="Three", expiration=86400, stamp=ts(first_stamp)),
        ],
    )
    out = csyncer.sync(inst)
    t0, run = clock.now, out.sync_run_id
    # a first sighting is "created" only, even with the timer on (not a change)
    assert events_of(engine, run) == [
        ("1@c.us", "created", None, "One", t0, run),
        ("2-3@g.us", "created", None, "Two", t0, run),
        ("3@c.us", "created", None, "Three", t0, run),
    ]
    assert out.chats_inserted == 3 and out.ephemeral_changes == 0

    # rename, archive, timer off (timestamp 0: valid_from is the observation time)
    t1 = clock.advance(3600)
    sim.set_chats(
        iid,
        [
            chat("1@c.us", name="Uno"),
            chat("2-3@g.us", name="Two", kind="group", archive=True),
            chat("3@c.us", name="Three"),
        ],
    )
    out = csyncer.sync(inst)
    run = out.sync_run_id
    assert events_of(engine, run) == [
        ("1@c.us", "renamed", "One", "Uno", t1, run),
        ("2-3@g.us", "archived", "false", "true", t1, run),
        ("3@c.us", "ephemeral_changed", "86400", "0", t1, run),
    ]
    assert (out.chats_updated, out.ephemeral_changes) == (3, 1)

    # unarchive, timer on with a plausible API timestamp (occurred_at = that timestamp),
    # and a removal (1 of 3 vanish: below the mass-removal threshold)
    t2 = clock.advance(3600)
    set_at = t2 - timedelta(seconds=90)
    sim.set_chats(
        iid,
        [
            chat("2-3@g.us", name="Two", kind="group"),
            chat("3@c.us", name="Three", expiration=604800, stamp=ts(set_at)),
        ],
    )
    out = csyncer.sync(inst)
    run = out.sync_run_id
    assert events_of(engine, run) == [
        ("2-3@g.us", "unarchived", "true", "false", t2, run),
        ("1@c.us", "removed", None, None, t2, run),
        ("3@c.us", "ephemeral_changed", "0", "604800", set_at, run),
    ]
    assert (out.chats_removed, out.ephemeral_changes) == (1, 1)

    # reappearance (same name: no rename) together with a rename of another chat, and the
    # same timer re-set with a new timestamp (a new setting event with old = new)
    t3 = clock.advance(3600)
    reset_at = t3 - timedelta(seconds=5)
    sim.set_chats(
        iid,
        [
            chat("1@c.us", name="Uno"),
            chat("2-3@g.us", name="Deux", kind="group"),
            chat("3@c.us", name="Three", expiration=604800, stamp=ts(reset_at)),
        ],
    )
    out = csyncer.sync(inst)
    run = out.sync_run_id
    assert events_of(engine, run) == [
        ("1@c.us", "reappeared", None, None, t3, run),
        ("2-3@g.us", "renamed", "Two", "Deux", t3, run),
        ("3@c.us", "ephemeral_changed", "604800", "604800", reset_at, run),
    ]

    # every ephemeral_changed event is exactly one history row opened by the same run,
    # with occurred_at = valid_from, and the ephemeral_changes view agrees
    opened = {
        (r.sync_run_id, as_utc(r.valid_from))
        for r in rows(engine, "SELECT sync_run_id, valid_from FROM chat_ephemeral_history")
    }
    eph = [e for e in events_of(engine) if e[1] == "ephemeral_changed"]
    assert len(eph) == 3 and all((e[5], e[4]) in opened for e in eph)
    view = rows(engine, "SELECT changed_at, sync_run_id FROM ephemeral_changes")
    assert sorted((as_utc(v[0]), v[1]) for v in view) == sorted((e[4], e[5]) for e in eph)
    # per run, the counters of sync_runs match the events
    for r in rows(engine, "SELECT * FROM sync_runs"):
        kinds = Counter(e[1] for e in events_of(engine, r.id))
        assert kinds["created"] == r.chats_inserted
        assert kinds["removed"] == r.chats_removed
        assert kinds["ephemeral_changed"] == r.ephemeral_changes
    check_history_invariants(engine)


def test_unchanged_tick_writes_no_events(sim, engine, csyncer, inst, clock):
    sim.set_chats(inst.id_instance, chats_list(5))
    csyncer.sync(inst)
    assert event_count(engine) == 5
    for _ in range(2):
        clock.advance(60)
        out = csyncer.sync(inst)
        assert (out.status, out.chats_updated) == ("ok", 0)
        assert events_of(engine, out.sync_run_id) == []
    assert event_count(engine) == 5


def test_anomaly_and_failed_ticks_write_no_events(sim, engine, csyncer, inst, clock):
    iid = inst.id_instance
    base = chats_list(10)
    sim.set_chats(iid, base)
    csyncer.sync(inst)
    assert event_count(engine) == 10
    sim.set_chats(iid, [])
    clock.advance(60)
    assert csyncer.sync(inst).error_kind == "empty_response"
    sim.set_chats(iid, base)
    for fault in (Fault(status=500), Fault(mode="html"), Fault(status=401)):
        sim.set_fault(iid, fault)
        clock.advance(60)
        assert csyncer.sync(inst).status == "failed"
    sim.set_fault(iid, None)
    assert event_count(engine) == 10
    # 7 of 10 vanish and one survivor is renamed: not applied, so not even the rename...
    shrunk = [dict(base[0], name="Renamed"), *base[1:3]]
    sim.set_chats(iid, shrunk)
    for _ in range(2):
        clock.advance(60)
        out = csyncer.sync(inst)
        assert (out.status, out.error_kind) == ("anomaly", "mass_removal")
        assert events_of(engine, out.sync_run_id) == []
    assert event_count(engine) == 10
    # ...until the third identical list confirms it: removals and rename, in that run
    applied_at = clock.advance(60)
    out = csyncer.sync(inst)
    assert (out.status, out.chats_removed) == ("ok", 7)
    got = events_of(engine, out.sync_run_id)
    renamed = (base[0]["id"], "renamed", base[0]["name"], "Renamed", applied_at, out.sync_run_id)
    assert got[0] == renamed
    assert sorted(e[0] for e in got[1:]) == sorted(c["id"] for c in base[3:])
    assert {(e[1], e[4]) for e in got[1:]} == {("removed", applied_at)}
    assert event_count(engine) == 18


def test_ephemeral_changed_occurred_at_follows_valid_from(sim, engine, csyncer, inst, clock):
    iid = inst.id_instance
    first = clock.now - timedelta(days=10)
    sim.set_chats(iid, [chat("1@c.us", expiration=86400, stamp=ts(first))])
    csyncer.sync(inst)
    cases = [
        # (API timestamp relative to the observation, expected occurred_at)
        (first - timedelta(days=1), "observed"),  # before the open row: implausible
        (timedelta(minutes=4), "stamp"),  # slightly in the future: clock skew, trusted
        (timedelta(minutes=10), "observed"),  # beyond the 5-minute allowance
    ]
    expiration = 86400
    for when, expect in cases:
        observed = clock.advance(3600)
        stamp = when if isinstance(when, datetime) else observed + when
        expiration = 604800 if expiration == 86400 else 86400
        sim.set_chats(iid, [chat("1@c.us", expiration=expiration, stamp=ts(stamp))])
        out = csyncer.sync(inst)
        (event,) = events_of(engine, out.sync_run_id)
        assert event[1] == "ephemeral_changed"
        assert event[4] == (stamp if expect == "stamp" else observed)
        opened = rows(
            engine,
            "SELECT valid_from FROM chat_ephemeral_history WHERE sync_run_id = :r",
            r=out.sync_run_id,
        )
        assert [as_utc(r[0]) for r in opened] == [event[4]]
    check_history_invariants(engine)


# ---------------------------------------------------------------------------------------
# The shared data set (one database per backend for the module)
# ---------------------------------------------------------------------------------------

A, B, C, D = 1101000001, 1101000002, 1101000003, 1101000009
A1, A2, A3, A4, A5 = (
    "79000000001@c.us",
    "79000000002@c.us",
    "79000000003-1500000000@g.us",
    "120363000000000004@g.us",
    "79000000005@c.us",
)
B1, B2 = "79000000011@c.us", "79000000012-1500000000@g.us"
C1, C2 = "79000000021@c.us", "120363000000000022@newsletter"


@dataclass
class BiData:
    """The data set and what it is designed to contain."""

    engine: Engine
    dialect: str
    day0: datetime  # midnight UTC six days before today
    recent: datetime  # the real now when the data was built (whole seconds)
    run_ids: dict[tuple[int, str], int] = field(default_factory=dict)
    #: (instance, tick, started_at, status, error_kind) of every run, in order
    runs: list[tuple[int, str, datetime, str, str | None]] = field(default_factory=list)
    #: (instance, chat, type, old, new, occurred_at, tick) of every event, in id order
    events: list[tuple[int, str, str, str | None, str | None, datetime, str]] = field(
        default_factory=list
    )
    #: (instance, chat) -> [(expiration, valid_from, valid_to, setting_at, tick)]
    history: dict[tuple[int, str], list[tuple[int, datetime, datetime | None, Any, str]]] = field(
        default_factory=dict
    )
    #: (instance, chat) -> [(valid_from, valid_to, tick)]: when it was in the list
    presence: dict[tuple[int, str], list[tuple[datetime, datetime | None, str]]] = field(
        default_factory=dict
    )

    def present(self, key: tuple[int, str], at: datetime) -> bool:
        return any(vf <= at and (vt is None or vt > at) for vf, vt, _ in self.presence.get(key, []))

    def d(self, day: int, hour: int = 0, minute: int = 0) -> datetime:
        return self.day0 + timedelta(days=day, hours=hour, minutes=minute)

    def param(self, dt: datetime, *, exact: bool = False) -> str:
        """A timestamp parameter as docs/queries.md tells analysts to pass it; ``exact``:
        the SQLite form with the fraction, which means exactly that instant."""
        dt = dt.astimezone(UTC)
        if self.dialect == "sqlite":
            return dt.strftime("%Y-%m-%d %H:%M:%S.%f" if exact else "%Y-%m-%d %H:%M:%S")
        return dt.strftime("%Y-%m-%d %H:%M:%S+00")


def _payloads(ds: BiData) -> dict[str, dict[int, list[Any]]]:
    d = ds.d
    a = {
        "k0": [
            chat(A1, name="Alice", expiration=86400, stamp=ts(d(0, 9))),
            chat(A2, name="Bob"),
            chat(A3, name="Team", kind="group"),
            chat(A4, name="Family", kind="group", expiration=604800, stamp=ts(d(-40, 12))),
        ],
    }
    a["k1"] = [
        chat(A1, name="Alice Smith", expiration=86400, stamp=ts(d(0, 9))),
        chat(A2, name="Bob", expiration=604800, stamp=ts(d(1, 9, 50))),
        chat(A3, name="Team", kind="group", archive=True),
        a["k0"][3],
    ]
    a["k2"] = [
        chat(A1, name="Alice Smith"),  # turned off: timestamp 0
        a["k1"][1],
        a["k1"][2],
        a["k1"][3],
        chat(A5, name="Eve", expiration=86400, stamp=ts(d(2, 9))),
    ]
    a["k3"] = [
        a["k2"][0],
        chat(A2, name="Bob", expiration=7776000, stamp=ts(d(3, 9))),
        chat(A3, name="Team", kind="group"),
        a["k2"][3],
        a["k2"][4],
    ]
    # B1 has its timer on, is removed at k2 and back at k3: every as-of answer between
    # them leaves it out
    b0 = [
        chat(B1, name="Carol", expiration=604800, stamp=ts(d(0, 9, 40))),
        chat(B2, name="Dev", kind="group", expiration=7776000, stamp=ts(d(0, 9, 30))),
    ]
    b3 = [chat(B1, name="Carol K", expiration=604800, stamp=ts(d(0, 9, 40))), b0[1]]
    b4 = [b3[0], chat(B2, name="Dev", kind="group", expiration=7776000, stamp=ts(d(4, 8)))]
    c0 = [chat(C1, name="Dan"), chat(C2, name="News", kind="channel")]
    return {
        "k0": {A: a["k0"], B: b0, C: c0},
        "k1": {A: a["k1"], B: b0, C: c0},
        "k2": {A: a["k2"], B: b0[1:], C: c0},
        "k3": {A: a["k3"], B: b3, C: []},
        "k4": {A: [], B: b4, C: []},
        "r1": {A: a["k3"], B: b4, C: []},
        "r2": {A: a["k3"], B: b4, C: []},
        "r3": {A: [], B: b4, C: []},
        "r4": {A: a["k3"], B: b4},
    }


#: tick -> instance -> (fault, expected status, expected error_kind); default: ok
_FAULTS: dict[str, dict[int, tuple[Fault | None, str, str | None]]] = {
    "k3": {C: (Fault(status=401), "failed", "unauthorized")},
    "k4": {
        A: (None, "anomaly", "empty_response"),
        C: (Fault(status=401), "failed", "unauthorized"),
    },
    "r1": {C: (Fault(status=401), "failed", "unauthorized")},
    "r2": {
        B: (Fault(status=403), "failed", "forbidden"),
        C: (Fault(status=401), "failed", "unauthorized"),
    },
    "r3": {
        A: (None, "anomaly", "empty_response"),
        B: (Fault(status=401), "failed", "unauthorized"),
        C: (Fault(status=401), "failed", "unauthorized"),
    },
    "r4": {B: (Fault(status=401), "failed", "unauthorized")},
}


def _expected_events(
    ds: BiData,
) -> list[tuple[int, str, str, str | None, str | None, datetime, str]]:
    d = ds.d
    return [
        (A, A1, "created", None, "Alice", d(0, 10), "k0"),
        (A, A2, "created", None, "Bob", d(0, 10), "k0"),
        (A, A3, "created", None, "Team", d(0, 10), "k0"),
        (A, A4, "created", None, "Family", d(0, 10), "k0"),
        (B, B1, "created", None, "Carol", d(0, 10), "k0"),
        (B, B2, "created", None, "Dev", d(0, 10), "k0"),
        (C, C1, "created", None, "Dan", d(0, 10), "k0"),
        (C, C2, "created", None, "News", d(0, 10), "k0"),
        (A, A1, "renamed", "Alice", "Alice Smith", d(1, 10), "k1"),
        (A, A3, "archived", "false", "true", d(1, 10), "k1"),
        (A, A2, "ephemeral_changed", "0", "604800", d(1, 9, 50), "k1"),
        (A, A5, "created", None, "Eve", d(2, 10), "k2"),
        (A, A1, "ephemeral_changed", "86400", "0", d(2, 10), "k2"),
        (B, B1, "removed", None, None, d(2, 10), "k2"),
        (A, A3, "unarchived", "true", "false", d(3, 10), "k3"),
        (A, A2, "ephemeral_changed", "604800", "7776000", d(3, 9), "k3"),
        (B, B1, "reappeared", None, None, d(3, 10), "k3"),
        (B, B1, "renamed", "Carol", "Carol K", d(3, 10), "k3"),
        (B, B2, "ephemeral_changed", "7776000", "7776000", d(4, 8), "k4"),
    ]


def _expected_history(ds: BiData) -> dict[tuple[int, str], list[Any]]:
    d = ds.d
    return {
        (A, A1): [(86400, d(0, 9), d(2, 10), d(0, 9), "k0"), (0, d(2, 10), None, None, "k2")],
        (A, A2): [
            (0, d(0, 10), d(1, 9, 50), None, "k0"),
            (604800, d(1, 9, 50), d(3, 9), d(1, 9, 50), "k1"),
            (7776000, d(3, 9), None, d(3, 9), "k3"),
        ],
        (A, A3): [(0, d(0, 10), None, None, "k0")],
        (A, A4): [(604800, d(-40, 12), None, d(-40, 12), "k0")],
        (A, A5): [(86400, d(2, 9), None, d(2, 9), "k2")],
        (B, B1): [(604800, d(0, 9, 40), None, d(0, 9, 40), "k0")],
        (B, B2): [
            (7776000, d(0, 9, 30), d(4, 8), d(0, 9, 30), "k0"),
            (7776000, d(4, 8), None, d(4, 8), "k4"),
        ],
        (C, C1): [(0, d(0, 10), None, None, "k0")],
        (C, C2): [(0, d(0, 10), None, None, "k0")],
    }


def _expected_presence(ds: BiData) -> dict[tuple[int, str], list[Any]]:
    d = ds.d
    always = {key: [(d(0, 10), None, "k0")] for key in ((A, A1), (A, A2), (A, A3), (A, A4))}
    return always | {
        (A, A5): [(d(2, 10), None, "k2")],
        (B, B1): [(d(0, 10), d(2, 10), "k0"), (d(3, 10), None, "k3")],
        (B, B2): [(d(0, 10), None, "k0")],
        (C, C1): [(d(0, 10), None, "k0")],
        (C, C2): [(d(0, 10), None, "k0")],
    }


def build_bi_data(engine: Engine, dialect: str) -> BiData:
    now = datetime.now(UTC).replace(microsecond=0)
    midnight = now.replace(hour=0, minute=0, second=0)
    ds = BiData(engine=engine, dialect=dialect, day0=midnight - timedelta(days=6), recent=now)
    times = {f"k{k}": ds.d(k, 10) for k in range(5)}
    times |= {
        "r1": now - timedelta(hours=3),
        "r2": now - timedelta(hours=2),
        "r3": now - timedelta(hours=1),
        "r4": now - timedelta(minutes=10),
    }
    payloads = _payloads(ds)
    with Simulator(instances=3, chats=0, seed=1) as sim:
        instances = [
            make_instance(sim, A, label="Sales"),
            make_instance(sim, B, label="Support"),
            make_instance(sim, C, label="Ops"),
        ]
        disabled = make_instance(sim, D, label="Old desk", enabled=False)
        clock = Clock(ds.d(0))
        register_instances(engine, [*instances, disabled], now=clock.now)
        client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
        try:
            syncer = Syncer(engine, client, clock=clock)
            for tick, at in times.items():
                clock.now = at
                for inst in instances:
                    iid = inst.id_instance
                    if iid not in payloads[tick]:
                        continue
                    fault, status, kind = _FAULTS.get(tick, {}).get(iid, (None, "ok", None))
                    sim.set_chats(iid, payloads[tick][iid])
                    sim.set_fault(iid, fault)
                    out = syncer.sync(inst)
                    assert (out.status, out.error_kind) == (status, kind), (tick, iid, out)
                    assert out.sync_run_id is not None
                    ds.run_ids[(iid, tick)] = out.sync_run_id
                    ds.runs.append((iid, tick, at, status, kind))
        finally:
            client.close()
    ds.events = _expected_events(ds)
    ds.history = _expected_history(ds)
    ds.presence = _expected_presence(ds)
    return ds


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def bi(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BiData]:
    """The shared data set, on each backend (a database of its own, dropped afterwards)."""
    drop: Callable[[], None] | None = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bi') / 'bi.db'}"
    else:
        admin: Engine = request.getfixturevalue("pg_admin")
        name = f"etl_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        url = (
            admin.url.set(database=name)
            .update_query_dict({"options": f"-c timezone={PG_SESSION_TZ}"})
            .render_as_string(hide_password=False)
        )
    engine = make_engine(url)
    try:
        upgrade(engine)
        if request.param == "postgres":
            assert rows(engine, "SHOW timezone")[0][0] == PG_SESSION_TZ
        yield build_bi_data(engine, engine.dialect.name)
    finally:
        engine.dispose()
        if drop is not None:
            drop()


# -- the data set is what it was designed to be -------------------------------------------


def test_data_set_history_is_as_designed(bi):
    got: dict[tuple[int, str], list[Any]] = {}
    for r in rows(
        bi.engine,
        "SELECT instance_id, chat_id, ephemeral_expiration, valid_from, valid_to, "
        "ephemeral_setting_at, sync_run_id FROM chat_ephemeral_history "
        "ORDER BY instance_id, chat_id, valid_from",
    ):
        got.setdefault((r[0], r[1]), []).append(
            (r[2], as_utc(r[3]), as_utc(r[4]), as_utc(r[5]), r[6])
        )
    want = {
        key: [(e, vf, vt, sa, bi.run_ids[(key[0], tick)]) for e, vf, vt, sa, tick in periods]
        for key, periods in bi.history.items()
    }
    assert got == want
    check_history_invariants(bi.engine)


def test_data_set_presence_is_as_designed(bi):
    got: dict[tuple[int, str], list[Any]] = {}
    for r in rows(
        bi.engine,
        "SELECT instance_id, chat_id, valid_from, valid_to, sync_run_id FROM chat_presence "
        "ORDER BY instance_id, chat_id, valid_from",
    ):
        got.setdefault((r[0], r[1]), []).append((as_utc(r[2]), as_utc(r[3]), r[4]))
    want = {
        key: [(vf, vt, bi.run_ids[(key[0], tick)]) for vf, vt, tick in periods]
        for key, periods in bi.presence.items()
    }
    assert got == want


def test_data_set_events_are_as_designed(bi):
    got = [
        (r[0], r[1], r[2], r[3], r[4], as_utc(r[5]), r[6])
        for r in rows(
            bi.engine,
            "SELECT instance_id, chat_id, event_type, old_value, new_value, occurred_at, "
            "sync_run_id FROM chat_events ORDER BY id",
        )
    ]
    want = [(i, c, t, o, n, at, bi.run_ids[(i, tick)]) for i, c, t, o, n, at, tick in bi.events]
    assert got == want
    # no event from an anomaly or a failed run
    bad = {bi.run_ids[(i, tick)] for i, tick, _, status, _ in bi.runs if status != "ok"}
    assert not {g[6] for g in got} & bad


# -- the views ---------------------------------------------------------------------------


def test_view_chats_current(bi):
    d = bi.d
    got = {
        (r["instance_id"], r["chat_id"]): (
            r["instance_label"],
            r["chat_type"],
            r["name"],
            bool(r["archived"]),
            r["ephemeral_expiration"],
            r["ephemeral_setting"],
            as_utc(r["ephemeral_setting_at"]),
            as_utc(r["first_seen_at"]),
            as_utc(r["updated_at"]),
        )
        for r in dicts(bi.engine, "SELECT * FROM chats_current")
    }
    assert got == {
        (A, A1): ("Sales", "user", "Alice Smith", False, 0, "off", None, d(0, 10), d(2, 10)),
        (A, A2): ("Sales", "user", "Bob", False, 7776000, "90 days", d(3, 9), d(0, 10), d(3, 10)),
        (A, A3): ("Sales", "group", "Team", False, 0, "off", None, d(0, 10), d(3, 10)),
        (A, A4): (
            "Sales",
            "group",
            "Family",
            False,
            604800,
            "7 days",
            d(-40, 12),
            d(0, 10),
            d(0, 10),
        ),
        (A, A5): ("Sales", "user", "Eve", False, 86400, "24 hours", d(2, 9), d(2, 10), d(2, 10)),
        (B, B1): (
            "Support",
            "user",
            "Carol K",
            False,
            604800,
            "7 days",
            d(0, 9, 40),
            d(0, 10),
            d(3, 10),
        ),
        (B, B2): (
            "Support",
            "group",
            "Dev",
            False,
            7776000,
            "90 days",
            d(4, 8),
            d(0, 10),
            d(4, 10),
        ),
        (C, C1): ("Ops", "user", "Dan", False, 0, "off", None, d(0, 10), d(0, 10)),
        (C, C2): ("Ops", "channel", "News", False, 0, "off", None, d(0, 10), d(0, 10)),
    }


def test_view_ephemeral_changes(bi):
    got = [
        (
            r["instance_id"],
            r["chat_id"],
            r["expiration_before"],
            r["expiration_after"],
            r["setting_before"],
            r["setting_after"],
            as_utc(r["changed_at"]),
            r["sync_run_id"],
            r["history_id"],
        )
        for r in dicts(bi.engine, "SELECT * FROM ephemeral_changes ORDER BY changed_at")
    ]
    history_ids = {
        (r[0], r[1], as_utc(r[2])): r[3]
        for r in rows(
            bi.engine, "SELECT instance_id, chat_id, valid_from, id FROM chat_ephemeral_history"
        )
    }
    want = []
    for (iid, cid), periods in bi.history.items():
        for prev, cur in zip(periods, periods[1:], strict=False):
            want.append(
                (
                    iid,
                    cid,
                    prev[0],
                    cur[0],
                    LABELS[prev[0]],
                    LABELS[cur[0]],
                    cur[1],
                    bi.run_ids[(iid, cur[4])],
                    history_ids[(iid, cid, cur[1])],
                )
            )
    assert got == sorted(want, key=lambda w: w[6])
    assert len(got) == 4
    # one ephemeral_changed event per change, at the same instant, from the same run
    events = sorted(
        (e[0], e[1], int(e[3]), int(e[4]), e[5], bi.run_ids[(e[0], e[6])])
        for e in bi.events
        if e[2] == "ephemeral_changed"
    )
    assert events == sorted((g[0], g[1], g[2], g[3], g[6], g[7]) for g in got)


def test_view_instance_sync_health(bi):
    d, now = bi.d, bi.recent
    got = {
        r["instance_id"]: (
            r["label"],
            bool(r["enabled"]),
            as_utc(r["last_run_at"]),
            r["last_status"],
            as_utc(r["last_success_at"]),
            r["consecutive_failures"],
            r["runs_24h"],
            r["success_ratio_24h"],
        )
        for r in dicts(bi.engine, "SELECT * FROM instance_sync_health")
    }
    ratios = {iid: got[iid][7] for iid in got}
    assert ratios[A] == pytest.approx(1.0)
    assert ratios[B] == pytest.approx(0.25)
    assert ratios[C] == pytest.approx(0.0)
    assert ratios[D] is None
    m10, h1, h3 = (now - timedelta(minutes=10), now - timedelta(hours=1), now - timedelta(hours=3))
    assert {iid: g[:7] for iid, g in got.items()} == {
        A: ("Sales", True, m10, "ok", m10, 0, 4),
        B: ("Support", True, m10, "failed", h3, 3, 4),
        C: ("Ops", True, h1, "failed", d(2, 10), 5, 3),
        D: ("Old desk", False, None, None, None, 0, 0),
    }


# ---------------------------------------------------------------------------------------
# docs/queries.md: every block parsed, run on its dialect(s), checked
# ---------------------------------------------------------------------------------------

FENCE = re.compile(r"^```(?P<info>[^`\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
NAME = re.compile(r"--\s*name:\s*(?P<name>[a-z][a-z0-9_]*)\s*")
#: bind parameters as SQLAlchemy's text() finds them
PARAM = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
DIALECTS = ("postgresql", "sqlite")


@dataclass(frozen=True)
class DocQuery:
    name: str
    dialect: str | None  # None: portable
    sql: str
    line: int


def parse_queries(markdown: str) -> list[DocQuery]:
    """Every ```sql block of the markdown; the first line of each must be its name marker."""
    found = []
    for m in FENCE.finditer(markdown):
        info = m.group("info").split()
        if not info or info[0] != "sql":
            continue
        line = markdown.count("\n", 0, m.start()) + 1
        body = m.group("body")
        first = body.split("\n", 1)[0]
        named = NAME.fullmatch(first)
        assert named, f"queries.md:{line}: first line must be '-- name: <id>', got {first!r}"
        assert len(info) <= 2, f"queries.md:{line}: bad fence info {m.group('info')!r}"
        dialect = info[1] if len(info) == 2 else None
        assert dialect in (None, *DIALECTS), f"queries.md:{line}: unknown dialect {dialect!r}"
        found.append(DocQuery(named.group("name"), dialect, body, line))
    return found


DOC_QUERIES = parse_queries(QUERIES_MD.read_text(encoding="utf-8"))


def query_for(name: str, dialect: str) -> DocQuery:
    blocks = [q for q in DOC_QUERIES if q.name == name]
    return next(q for q in blocks if q.dialect in (dialect, None))


Run = Callable[..., list[dict[str, Any]]]
CHECKS: dict[str, Callable[[Run, BiData], None]] = {}


def check(name: str) -> Callable[[Callable[[Run, BiData], None]], Callable[[Run, BiData], None]]:
    def register(fn: Callable[[Run, BiData], None]) -> Callable[[Run, BiData], None]:
        assert name not in CHECKS, f"two checks for {name}"
        CHECKS[name] = fn
        return fn

    return register


def test_queries_md_is_well_formed():
    assert DOC_QUERIES, "no queries found in docs/queries.md"
    by_name: dict[str, list[str | None]] = {}
    for q in DOC_QUERIES:
        by_name.setdefault(q.name, []).append(q.dialect)
    for name, dialects in by_name.items():
        assert sorted(dialects, key=str) in ([None], sorted(DIALECTS)), (
            f"{name}: either one portable ```sql block or one ```sql postgresql and one "
            f"```sql sqlite block, got {dialects}"
        )
    # every documented query has a heading and an explanation before it
    text_ = QUERIES_MD.read_text(encoding="utf-8")
    for q in DOC_QUERIES:
        before = text_.split("\n")[: q.line - 1]
        assert any(line.startswith("### ") for line in before), q.name


def test_every_documented_query_has_a_check_and_vice_versa():
    documented = {q.name for q in DOC_QUERIES}
    assert not documented - set(CHECKS), f"queries without a check: {documented - set(CHECKS)}"
    assert not set(CHECKS) - documented, f"checks without a query: {set(CHECKS) - documented}"


@pytest.mark.parametrize("name", sorted({q.name for q in DOC_QUERIES}))
def test_documented_query(bi, name):
    if name not in CHECKS:
        pytest.fail(f"docs/queries.md query {name!r} has no check in tests/test_bi.py")
    query = query_for(name, bi.dialect)
    wanted = set(PARAM.findall(query.sql))
    calls: list[set[str]] = []

    def run(**params: Any) -> list[dict[str, Any]]:
        assert set(params) == wanted, f"{name}: the query takes {wanted}, got {set(params)}"
        calls.append(set(params))
        with bi.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(query.sql), params)]

    CHECKS[name](run, bi)
    assert calls, f"the check for {name} never ran the query"


# -- one check per documented query ---------------------------------------------------------


@check("ephemeral_on_at")
def check_ephemeral_on_at(run: Run, bi: BiData) -> None:
    d = bi.d

    def on_at(at: datetime, *, exact: bool = False) -> list[tuple[Any, ...]]:
        return [
            (
                r["instance_id"],
                r["chat_id"],
                r["name"],
                r["ephemeral_expiration"],
                r["setting"],
                as_utc(r["on_since"]),
            )
            for r in run(at=bi.param(at, exact=exact))
        ]

    # ordered by instance, then chat id ("1203…@g.us" sorts before "7900…@c.us")
    b1 = (B, B1, "Carol K", 604800, "7 days", d(0, 9, 40))
    assert on_at(d(1, 12)) == [
        (A, A4, "Family", 604800, "7 days", d(-40, 12)),
        (A, A1, "Alice Smith", 86400, "24 hours", d(0, 9)),
        (A, A2, "Bob", 604800, "7 days", d(1, 9, 50)),
        b1,
        (B, B2, "Dev", 7776000, "90 days", d(0, 9, 30)),
    ]
    # a period starts at valid_from inclusive and ends at valid_to exclusive: at exactly
    # 10:00 on day 2 a1 is off and b1 has left the list (on SQLite that needs the
    # fractional form, as documented)
    assert on_at(d(2, 10), exact=True) == [
        (A, A4, "Family", 604800, "7 days", d(-40, 12)),
        (A, A2, "Bob", 604800, "7 days", d(1, 9, 50)),
        (A, A5, "Eve", 86400, "24 hours", d(2, 9)),
        (B, B2, "Dev", 7776000, "90 days", d(0, 9, 30)),
    ]
    # the documented short SQLite form means "just before that second": a1 still on, b1
    # still there, a5 (first seen at 10:00) not yet
    just_before = on_at(d(2, 10))
    if bi.dialect == "sqlite":
        assert (A, A1, "Alice Smith", 86400, "24 hours", d(0, 9)) in just_before
        assert [r[1] for r in just_before] == [A4, A1, A2, B1, B2]
    else:
        assert just_before == on_at(d(2, 10), exact=True)
    # b1 kept its timer while it was gone, yet is absent from every answer between its
    # removal (day 2, 10:00) and its return (day 3, 10:00), and present again after
    for hours in (2, 12, 23):
        assert b1 not in on_at(d(2, 10) + timedelta(hours=hours))
    assert b1 not in on_at(d(3, 9, 59))
    assert b1 in on_at(d(3, 10), exact=True) and b1 in on_at(d(5))
    # before its first sighting no chat is counted, even one whose setting is older (its
    # timeline still starts then)
    assert on_at(d(-41)) == []
    assert on_at(d(-30)) == []
    assert [r[1] for r in on_at(d(0, 10), exact=True)] == [A4, A1, B1, B2]


@check("current_settings_per_instance")
def check_current_settings_per_instance(run: Run, bi: BiData) -> None:
    got = [
        (r["instance_id"], r["instance_label"], r["ephemeral_setting"], r["chats"]) for r in run()
    ]
    assert got == [
        (A, "Sales", "off", 2),
        (A, "Sales", "24 hours", 1),
        (A, "Sales", "7 days", 1),
        (A, "Sales", "90 days", 1),
        (B, "Support", "7 days", 1),
        (B, "Support", "90 days", 1),
        (C, "Ops", "off", 2),
    ]


@check("ephemeral_adoption_daily")
def check_ephemeral_adoption_daily(run: Run, bi: BiData) -> None:
    for _attempt in range(3):  # retried only if the UTC date changes while it runs
        today = datetime.now(UTC).date()
        got = [
            (as_day(r["day"]), r["ephemeral_expiration"], r["setting"], r["chats"]) for r in run()
        ]
        if today == datetime.now(UTC).date():
            break
    want = []
    for back in range(29, -1, -1):
        day = today - timedelta(days=back)
        end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        per: Counter[int] = Counter()
        for key, periods in bi.history.items():
            for expiration, valid_from, valid_to, _, _ in periods:
                # in the list at the end of the day too (a chat back at midnight counts)
                if (
                    valid_from < end
                    and (valid_to is None or valid_to >= end)
                    and bi.present(key, end - timedelta(microseconds=1))
                ):
                    per[expiration] += 1
        want += [(day.isoformat(), e, LABELS[e], n) for e, n in sorted(per.items())]
    assert got == want
    # spot checks of the oracle itself: before the first sync no chat (not even the
    # backdated one), on day 1 (a2 turned on, a1 still on), on day 2 b1 gone, and from
    # day 3 on (a2 at 90 days, b1 back)
    by_day = {}
    for day, _, label, n in got:
        by_day.setdefault(day, {})[label] = n
    assert min(by_day) == bi.d(0).date().isoformat()
    assert by_day[bi.d(1).date().isoformat()] == {
        "off": 3,
        "24 hours": 1,
        "7 days": 3,
        "90 days": 1,
    }
    assert by_day[bi.d(2).date().isoformat()] == {
        "off": 4,
        "24 hours": 1,
        "7 days": 2,
        "90 days": 1,
    }
    assert by_day[today.isoformat()] == {"off": 4, "24 hours": 1, "7 days": 2, "90 days": 2}


@check("ephemeral_changes_per_day")
def check_ephemeral_changes_per_day(run: Run, bi: BiData) -> None:
    d = bi.d
    got = [
        (as_day(r["day"]), r["setting_before"], r["setting_after"], r["changes"])
        for r in run(since=bi.param(d(0)))
    ]
    assert got == [
        (d(1).date().isoformat(), "off", "7 days", 1),
        (d(2).date().isoformat(), "24 hours", "off", 1),
        (d(3).date().isoformat(), "7 days", "90 days", 1),
        (d(4).date().isoformat(), "90 days", "90 days", 1),
    ]
    assert len(run(since=bi.param(d(3, 9)))) == 2  # inclusive bound
    assert run(since=bi.param(d(4, 8, 1))) == []


@check("ephemeral_timeline")
def check_ephemeral_timeline(run: Run, bi: BiData) -> None:
    d = bi.d
    got = [
        (
            as_utc(r["valid_from"]),
            as_utc(r["valid_to"]),
            r["ephemeral_expiration"],
            r["setting"],
            as_utc(r["ephemeral_setting_at"]),
            r["sync_run_id"],
            r["is_current"],
        )
        for r in run(instance_id=A, chat_id=A2)
    ]
    assert got == [
        (d(0, 10), d(1, 9, 50), 0, "off", None, bi.run_ids[(A, "k0")], 0),
        (d(1, 9, 50), d(3, 9), 604800, "7 days", d(1, 9, 50), bi.run_ids[(A, "k1")], 0),
        (d(3, 9), None, 7776000, "90 days", d(3, 9), bi.run_ids[(A, "k3")], 1),
    ]
    assert run(instance_id=B, chat_id=A2) == []  # a chat belongs to one instance


@check("chats_by_type_per_instance")
def check_chats_by_type_per_instance(run: Run, bi: BiData) -> None:
    got = [
        (
            r["instance_id"],
            r["instance_label"],
            r["user_chats"],
            r["group_chats"],
            r["other_chats"],
            r["total_chats"],
        )
        for r in run()
    ]
    assert got == [(A, "Sales", 3, 2, 0, 5), (B, "Support", 1, 1, 0, 2), (C, "Ops", 1, 0, 1, 2)]


@check("chats_present_at")
def check_chats_present_at(run: Run, bi: BiData) -> None:
    d = bi.d

    def at(when: datetime, **kw: Any) -> list[tuple[Any, ...]]:
        return [
            (r["instance_id"], r["chat_type"], r["chats"]) for r in run(at=bi.param(when, **kw))
        ]

    # day 2, noon: b1 removed at 10:00, a5 first seen then
    assert at(d(2, 12)) == [
        (A, "group", 2),
        (A, "user", 3),
        (B, "group", 1),
        (C, "channel", 1),
        (C, "user", 1),
    ]
    assert (B, "user", 1) in at(d(1, 12)) and (B, "user", 1) in at(d(3, 12))
    # back at 10:00 exactly: the short SQLite form is just before it
    assert ((B, "user", 1) in at(d(3, 10))) == (bi.dialect == "postgresql")
    assert (B, "user", 1) in at(d(3, 10), exact=True)
    assert at(d(0, 9)) == []  # before the first sync
    # the oracle: every chat present at the instant, per instance
    for when in (d(0, 12), d(2, 11), d(4, 12)):
        got: Counter[int] = Counter()
        for i, _, n in at(when):
            got[i] += n
        assert got == Counter(key[0] for key in bi.presence if bi.present(key, when))


@check("chats_present_daily")
def check_chats_present_daily(run: Run, bi: BiData) -> None:
    for _attempt in range(3):  # retried only if the UTC date changes while it runs
        today = datetime.now(UTC).date()
        got = [(as_day(r["day"]), r["instance_id"], r["chats"]) for r in run()]
        if today == datetime.now(UTC).date():
            break
    want = []
    for back in range(29, -1, -1):
        day = today - timedelta(days=back)
        end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        per = Counter(k[0] for k in bi.presence if bi.present(k, end - timedelta(microseconds=1)))
        want += [(day.isoformat(), i, n) for i, n in sorted(per.items())]
    assert got == want
    # b1 is gone at the end of day 2 only
    by_day = {(day, i): n for day, i, n in got}
    assert [by_day[(bi.d(k).date().isoformat(), B)] for k in range(5)] == [2, 2, 1, 2, 2]


@check("presence_timeline")
def check_presence_timeline(run: Run, bi: BiData) -> None:
    d = bi.d
    got = [
        (as_utc(r["valid_from"]), as_utc(r["valid_to"]), r["sync_run_id"], r["is_current"])
        for r in run(instance_id=B, chat_id=B1)
    ]
    assert got == [
        (d(0, 10), d(2, 10), bi.run_ids[(B, "k0")], 0),
        (d(3, 10), None, bi.run_ids[(B, "k3")], 1),
    ]
    assert [r["is_current"] for r in run(instance_id=A, chat_id=A5)] == [1]
    assert run(instance_id=A, chat_id=B1) == []


def _check_incremental(table: str) -> Callable[[Run, BiData], None]:
    """The incremental query of ``table``: from 0 every row once, in cursor order, all
    below the watermark; from the largest cursor, nothing (on PostgreSQL a transaction left
    open elsewhere on the server holds the watermark back, so wait for it)."""

    def check_incremental(run: Run, bi: BiData) -> None:
        top = int(scalar(bi.engine, f"SELECT MAX(change_seq) FROM {table}"))
        deadline = time.monotonic() + 60
        while int(scalar(bi.engine, "SELECT watermark FROM load_watermark")) <= top:
            assert time.monotonic() < deadline, "the watermark never passed the data"
            time.sleep(0.5)
        got = run(last=0)
        seqs = [r["change_seq"] for r in got]
        assert seqs == sorted(seqs) and all(q > 1 for q in seqs), "numbered by the sync"
        assert len(got) == scalar(bi.engine, f"SELECT COUNT(*) FROM {table}") > 0
        assert run(last=top) == []
        # a cursor in the middle gives exactly the rows above it
        middle = seqs[len(seqs) // 2]
        assert [r["change_seq"] for r in run(last=middle)] == [q for q in seqs if q > middle]

    return check_incremental


@check("incremental_chat_aliases")
def check_incremental_chat_aliases(run: Run, bi: BiData) -> None:
    """The BI data has no id change, so no alias: the query answers nothing. Its rows as
    an id switch writes them: test_green_api.py::test_an_id_switch_reaches_incremental_loads."""
    assert scalar(bi.engine, "SELECT COUNT(*) FROM chat_aliases") == 0
    assert run(last=0) == []


for _table in (
    "chats",
    "chat_ephemeral_history",
    "chat_presence",
    "chat_events",
    "sync_runs",
    "instances",
):
    check(f"incremental_{_table}")(_check_incremental(_table))


@check("changes_per_day")
def check_changes_per_day(run: Run, bi: BiData) -> None:
    since = bi.d(1)
    got = [(as_day(r["day"]), r["event_type"], r["events"]) for r in run(since=bi.param(since))]
    want = Counter(
        (at.date().isoformat(), kind) for _, _, kind, _, _, at, _ in bi.events if at >= since
    )
    assert got == [(day, kind, n) for (day, kind), n in sorted(want.items())]
    assert (bi.d(3).date().isoformat(), "renamed", 1) in got
    everything = run(since=bi.param(bi.d(-1)))
    assert sum(r["events"] for r in everything) == len(bi.events)


@check("events_since")
def check_events_since(run: Run, bi: BiData) -> None:
    since = bi.d(3)
    names = {(A, A2): "Bob", (A, A3): "Team", (B, B1): "Carol K", (B, B2): "Dev"}
    got = [
        (
            as_utc(r["occurred_at"]),
            r["instance_id"],
            r["chat_id"],
            r["name"],
            r["event_type"],
            r["old_value"],
            r["new_value"],
            r["sync_run_id"],
        )
        for r in run(since=bi.param(since))
    ]
    ordered = sorted(
        (e for e in bi.events if e[5] >= since), key=lambda e: (e[5], bi.events.index(e))
    )
    want = [
        (at, i, c, names[(i, c)], kind, old, new, bi.run_ids[(i, tick)])
        for i, c, kind, old, new, at, tick in ordered
    ]
    assert got == want
    # occurred_at, not the recording sync, orders the timeline: a2's change at 09:00 was
    # recorded by the 10:00 sync after a3's unarchiving (a smaller id), yet comes first
    assert [g[4] for g in got] == [
        "ephemeral_changed",
        "unarchived",
        "reappeared",
        "renamed",
        "ephemeral_changed",
    ]


@check("failing_instances")
def check_failing_instances(run: Run, bi: BiData) -> None:
    got = [
        (
            r["instance_id"],
            r["label"],
            as_utc(r["last_run_at"]),
            as_utc(r["last_success_at"]),
            r["consecutive_failures"],
            r["last_error_kind"],
        )
        for r in run()
    ]
    now = bi.recent
    assert got == [
        (C, "Ops", now - timedelta(hours=1), bi.d(2, 10), 5, "unauthorized"),
        (B, "Support", now - timedelta(minutes=10), now - timedelta(hours=3), 3, "unauthorized"),
    ]
    ratios = [r["success_ratio_24h"] for r in run()]
    assert ratios == [pytest.approx(0.0), pytest.approx(0.25)]


@check("sync_outcomes_per_hour")
def check_sync_outcomes_per_hour(run: Run, bi: BiData) -> None:
    for since in (bi.d(0), bi.recent - timedelta(hours=2, minutes=30)):
        got = [
            (as_utc(r["hour"]), r["runs"], r["ok"], r["anomaly"], r["failed"])
            for r in run(since=bi.param(since))
        ]
        per: dict[datetime, Counter[str]] = {}
        for _, _, at, status, _ in bi.runs:
            if at >= since:
                hour = at.replace(minute=0, second=0, microsecond=0)
                per.setdefault(hour, Counter())[status] += 1
        want = [
            (hour, sum(c.values()), c["ok"], c["anomaly"], c["failed"])
            for hour, c in sorted(per.items())
        ]
        assert got == want
        assert sum(g[1] for g in got) == sum(1 for r in bi.runs if r[2] >= since)


@check("problems_by_kind")
def check_problems_by_kind(run: Run, bi: BiData) -> None:
    now = bi.recent
    got = [
        (r["instance_id"], r["status"], r["error_kind"], r["runs"], as_utc(r["last_at"]))
        for r in run(since=bi.param(bi.d(0)))
    ]
    assert got == [
        (A, "anomaly", "empty_response", 2, now - timedelta(hours=1)),
        (B, "failed", "forbidden", 1, now - timedelta(hours=2)),
        (B, "failed", "unauthorized", 2, now - timedelta(minutes=10)),
        (C, "failed", "unauthorized", 5, now - timedelta(hours=1)),
    ]
    got = [(r["instance_id"], r["runs"]) for r in run(since=bi.param(now - timedelta(minutes=90)))]
    assert got == [(A, 1), (B, 2), (C, 1)]


# ---------------------------------------------------------------------------------------
# docs/schema.md documents every table, view and column of the migrated database
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocColumn:
    pg: str  # the first `TYPE` of the PostgreSQL cell, lower case
    sqlite: str  # the first `TYPE` of the SQLite cell, lower case ("" when not a `TYPE`)
    nullable: bool


def _first_type(cell: str) -> str:
    m = re.match(r"\s*`([A-Z ]+)`", cell)
    return m.group(1).lower() if m else ""


def _documented_columns() -> dict[str, dict[str, DocColumn]]:
    """{table or view: {column: DocColumn}} from the "| column | PG | SQLite | null | meaning |"
    table under each ### `name` heading of docs/schema.md."""
    doc: dict[str, dict[str, DocColumn]] = {}
    current: str | None = None
    in_columns = False
    for line in SCHEMA_MD.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"###\s+`(\w+)`\s*", line)
        if line.startswith("#"):
            current = heading.group(1) if heading else None
            if current:
                assert current not in doc, f"two sections for {current}"
                doc[current] = {}
            in_columns = False
            continue
        if current and line.startswith("| column | PG | SQLite | null | meaning |"):
            in_columns = True
            continue
        if not line.strip():
            if in_columns:
                current = None  # only the first column table of a section
            in_columns = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0]) if cells else None
        if current and in_columns and name:
            assert cells[3] in ("no", "yes"), f"{current}.{cells[0]}: null must be yes/no"
            doc[current][name.group(1)] = DocColumn(
                _first_type(cells[1]), _first_type(cells[2]), cells[3] == "yes"
            )
    return doc


PG_TYPES = {"timestamptz": "timestamp with time zone"}
TABLES = set(Base.metadata.tables)  # every model table must be documented
VIEWS = {
    "chats_current",
    "ephemeral_changes",
    "instance_sync_health",
    "present_ephemeral_history",
    "load_watermark",
}


def test_schema_md_documents_every_table_view_and_column(bi):
    """Names, types and nullability of docs/schema.md against the migrated database."""
    insp = inspect(bi.engine)
    assert set(insp.get_table_names()) - {"alembic_version"} == TABLES
    assert set(insp.get_view_names()) == VIEWS
    doc = _documented_columns()
    assert set(doc) == TABLES | VIEWS
    for name in sorted(TABLES | VIEWS):
        if bi.dialect == "postgresql":
            actual = {
                r[0]: (r[1], r[2] == "YES")
                for r in rows(
                    bi.engine,
                    "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = :t",
                    t=name,
                )
            }
            documented = {c: (PG_TYPES.get(d.pg, d.pg), d.nullable) for c, d in doc[name].items()}
        else:
            info = rows(bi.engine, f"PRAGMA table_info({name})")
            actual = {r[1]: (r[2].lower(), not r[3]) for r in info}
            documented = {c: (d.sqlite, d.nullable) for c, d in doc[name].items()}
        if name in VIEWS:  # views report every column nullable; compare names and PG types
            actual = {c: t for c, (t, _) in actual.items()}
            documented = {c: t for c, (t, _) in documented.items()}
            if bi.dialect == "sqlite":
                actual, documented = set(actual), set(documented)
        assert documented == actual, f"docs/schema.md vs the database for {name}"
    text_ = SCHEMA_MD.read_text(encoding="utf-8")
    for kind in (
        "created",
        "renamed",
        "archived",
        "unarchived",
        "ephemeral_changed",
        "removed",
        "reappeared",
        "id_changed",
    ):
        assert f"| `{kind}` |" in text_, kind
    for label in LABELS.values():
        assert f"`{label}`" in text_, label


# -- README.md's "Example SQL" runs as printed ---------------------------------------------


def readme_example_sql() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Example SQL", 1)[1].split("\n## ", 1)[0]
    blocks = [m.group("body") for m in FENCE.finditer(section) if m.group("info").strip() == "sql"]
    assert blocks, "README.md has no ```sql block under '## Example SQL'"
    return [s.strip() for b in blocks for s in b.split(";") if s.strip()]


def test_readme_example_sql_runs(bi):
    statements = readme_example_sql()
    assert len(statements) >= 4
    with bi.engine.connect() as conn:
        results = [conn.execute(text(s)).all() for s in statements]
    # "Instances whose last sync failed" agrees with the health view (latest by started_at)
    failing = {r[0] for r in results[-1]}
    expected = {
        r[0]
        for r in rows(
            bi.engine, "SELECT instance_id FROM instance_sync_health WHERE last_status = 'failed'"
        )
    }
    assert expected and failing == expected

"""Shared fixtures: a database per test on every backend, the simulator, instance factories.

Every database test runs on SQLite and, when ``ETL_TEST_POSTGRES_URL`` is set, on
PostgreSQL in a database of its own that is dropped afterwards. With
``ETL_TEST_REQUIRE_POSTGRES=1`` (CI) a missing or unreachable server is an error, not
a skip.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from etl.client import GreenApiClient
from etl.config import Instance
from etl.db import make_engine, normalise_url, upgrade
from etl.redact import register_secret
from etl.simulator import Simulator
from etl.sync import Syncer

PG_URL = os.environ.get("ETL_TEST_POSTGRES_URL")
REQUIRE_PG = os.environ.get("ETL_TEST_REQUIRE_POSTGRES") == "1"
CANARY = "canary" + "c0ffee" * 7 + "beef"  # 50 chars, looks like a real token


def _pg_admin_url() -> str:
    assert PG_URL
    return normalise_url(PG_URL)


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_PG and not PG_URL:
        raise pytest.UsageError("ETL_TEST_REQUIRE_POSTGRES=1 but ETL_TEST_POSTGRES_URL is not set")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    if not PG_URL:
        pytest.skip("ETL_TEST_POSTGRES_URL not set")
    engine = create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL at ETL_TEST_POSTGRES_URL is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    yield engine
    engine.dispose()


def _new_pg_database(
    admin: Engine, *, template: str | None = None
) -> tuple[str, Callable[[], None]]:
    name = f"etl_test_{uuid.uuid4().hex[:12]}"
    suffix = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    url = make_url(_pg_admin_url()).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return url, drop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL on each backend, removed after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    admin = request.getfixturevalue("pg_admin")
    url, drop = _new_pg_database(admin)
    try:
        yield url
    finally:
        drop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (much faster than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    eng = make_engine(f"sqlite:///{path}")
    upgrade(eng)
    eng.dispose()
    raw = sqlite3.connect(path)  # fold the WAL into the main file so one copy is complete
    raw.execute("PRAGMA journal_mode = DELETE")
    raw.close()
    return path


@pytest.fixture(scope="session")
def pg_template(pg_admin: Engine) -> Iterator[str]:
    """A migrated PostgreSQL database used as TEMPLATE for each test's database."""
    url, drop = _new_pg_database(pg_admin)
    eng = make_engine(url)
    upgrade(eng)
    eng.dispose()
    yield make_url(url).database or ""
    drop()


@pytest.fixture
def pg_db(pg_admin: Engine, pg_template: str) -> Iterator[str]:
    """The URL of a migrated PostgreSQL database of its own, dropped afterwards."""
    url, drop = _new_pg_database(pg_admin, template=pg_template)
    try:
        yield url
    finally:
        drop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database URL on each backend, for subprocesses (removed afterwards)."""
    if request.param == "sqlite":
        path = tmp_path / "migrated.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    yield request.getfixturevalue("pg_db")


#: a test of the ``engine`` fixture on PostgreSQL only (replicas, leases, plans)
pg_only = pytest.mark.parametrize(
    "engine", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database of its own on each backend, removed after the test."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        eng = make_engine(f"sqlite:///{path}")
        yield eng
        eng.dispose()
        return
    admin = request.getfixturevalue("pg_admin")
    url, drop = _new_pg_database(admin, template=request.getfixturevalue("pg_template"))
    eng = make_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()
        drop()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(instances=3, chats=30, seed=7) as s:
        yield s


@pytest.fixture
def canary_sim() -> Iterator[Simulator]:
    """A simulator whose every instance uses the canary token."""
    register_secret(CANARY)
    with Simulator(instances=2, chats=20, seed=11, token=CANARY) as s:
        yield s


def make_instance(sim: Simulator, id_instance: int | None = None, **overrides: Any) -> Instance:
    """An Instance pointing at the simulator, with test-friendly defaults."""
    iid = id_instance if id_instance is not None else sim.instance_ids[0]
    token = sim.token_for(iid) if iid in sim.instance_ids else "0" * 50
    return instance_at(sim.url, iid, token, **overrides)


def instance_at(api_url: str, id_instance: int, token: str, /, **overrides: Any) -> Instance:
    """An Instance with test-friendly defaults at ``api_url`` (its token registered for
    redaction); ``overrides`` may replace any field, the URL and the token too."""
    register_secret(token)
    values: dict[str, Any] = {
        "id_instance": id_instance,
        "label": f"test {id_instance}",
        "api_url": api_url,
        "token": SecretStr(token),
        "count": None,
        "enabled": True,
        "interval_seconds": 60,
        "timeout_seconds": 2.0,
        "connect_timeout_seconds": 1.0,
        "max_attempts": 4,
        "mass_removal_threshold": 0.5,
        "mass_removal_confirmations": 3,
    }
    values.update(overrides)
    if "token" in overrides and isinstance(overrides["token"], str):
        values["token"] = SecretStr(overrides["token"])
    return Instance(**values)


@pytest.fixture
def fast_client() -> Iterator[GreenApiClient]:
    client = GreenApiClient(backoff_initial=0.01, backoff_max=0.05)
    yield client
    client.close()


@pytest.fixture
def syncer(engine: Engine, fast_client: GreenApiClient) -> Syncer:
    return Syncer(engine, fast_client)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything, urllib3 DEBUG included."""
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "urllib3.connectionpool", "etl", "apscheduler"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog

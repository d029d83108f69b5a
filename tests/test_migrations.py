"""Alembic migrations on SQLite and PostgreSQL: stairway, single head, no drift, clean
downgrade, the partial unique index, and the ``alembic`` / ``etl db`` command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Table, insert, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

import etl.db
from etl.db import (
    ROOT,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from etl.models import Base, ChatEphemeralHistory

OPEN_INDEX = "uq_chat_ephemeral_history_open"
CORE_TABLES = {"instances", "chats", "chat_ephemeral_history", "sync_runs", "instance_sync_state"}


@pytest.fixture
def bare(db_url: str) -> Iterator[Engine]:
    """An engine on an empty (not migrated) database."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _revisions_base_to_head() -> list[Any]:
    return list(reversed(list(_script().walk_revisions("base", "heads"))))


def _schema_objects(engine: Engine) -> set[str]:
    """Every table, view, index and sequence in the database (schema public / main)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            sql = (
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'i', 'S', 'p')"
            )
        else:
            sql = "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        return {r[0] for r in conn.execute(text(sql))}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ETL_DATABASE_URL", "ETL_CONFIG")}
    env.update(extra)
    return env


# -- the revision graph ------------------------------------------------------------------


def test_single_head_and_linear_history() -> None:
    script = _script()
    assert len(script.get_heads()) == 1, f"several heads: {script.get_heads()}"
    assert len(script.get_bases()) == 1, f"several bases: {script.get_bases()}"
    revs = _revisions_base_to_head()
    assert revs, "no revisions at all"
    assert revs[0].down_revision is None
    for prev, rev in zip(revs, revs[1:], strict=False):
        assert rev.down_revision == prev.revision, f"{rev.revision} does not follow {prev}"
    assert revs[-1].revision == head_revision()


@pytest.mark.parametrize(
    "down_revision",
    ['"{head}"', "'{head}'", '("{head}",)'],
    ids=["double-quoted", "single-quoted", "a merge's tuple"],
)
def test_head_revision_read_from_the_scripts_agrees_with_alembic(
    down_revision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``head_revision`` reads the scripts' ``revision`` / ``down_revision`` lines instead
    of importing Alembic and every script; what it cannot read as one chain (here a
    merge's tuple) it leaves to Alembic. Either way it names Alembic's head."""
    head = head_revision()
    assert head == _script().get_current_head()
    migrations = tmp_path / "migrations"
    shutil.copytree(etl.db.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "9999_next.py").write_text(
        '"""A revision after the head."""\n\n'
        'revision: str = "9999"\n'
        f"down_revision = {down_revision.format(head=head)}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(etl.db, "MIGRATIONS", migrations)
    assert head_revision() == "9999" == etl.db._alembic_head_revision()


def test_stairway_every_revision_up_down_up(bare: Engine) -> None:
    revs = _revisions_base_to_head()
    for rev in revs:
        upgrade(bare, rev.revision)
        assert current_revision(bare) == rev.revision
        after_upgrade = _schema_objects(bare)
        downgrade(bare, "-1")
        assert current_revision(bare) == rev.down_revision, f"downgrade of {rev.revision}"
        upgrade(bare, rev.revision)
        assert current_revision(bare) == rev.revision
        assert _schema_objects(bare) == after_upgrade, f"{rev.revision}: up-down-up differs"
    assert current_revision(bare) == head_revision()


def test_downgrade_base_leaves_only_alembic_version(bare: Engine) -> None:
    upgrade(bare)
    assert set(inspect(bare).get_table_names()) >= CORE_TABLES
    downgrade(bare, "base")
    insp = inspect(bare)
    assert insp.get_table_names() == ["alembic_version"]
    assert insp.get_view_names() == []
    leftovers = _schema_objects(bare) - {"alembic_version", "alembic_version_pkc"}
    assert leftovers == set(), f"left behind by downgrade base: {sorted(leftovers)}"
    assert current_revision(bare) is None


# -- the head schema ---------------------------------------------------------------------


def test_no_drift_between_models_and_migrations(bare: Engine) -> None:
    upgrade(bare)
    with bare.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(mc, Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    with bare.begin() as conn:
        command.check(alembic_config(connection=conn))  # raises AutogenerateDiffsDetected


def test_head_has_every_table_and_the_open_row_index(bare: Engine) -> None:
    upgrade(bare)
    insp = inspect(bare)
    tables = set(insp.get_table_names())
    expected = CORE_TABLES | set(Base.metadata.tables) | {"alembic_version"}
    assert expected <= tables, f"missing: {sorted(expected - tables)}"
    indexes = {ix["name"]: ix for ix in insp.get_indexes("chat_ephemeral_history")}
    assert OPEN_INDEX in indexes
    ix = indexes[OPEN_INDEX]
    assert ix["unique"]
    assert list(ix["column_names"]) == ["instance_id", "chat_id"]
    where = ix.get("dialect_options", {}).get(f"{bare.dialect.name}_where")
    assert where is not None, f"{OPEN_INDEX} is not partial: {ix}"
    assert "valid_to is null" in str(where).lower().replace('"', "")
    with bare.connect() as conn:  # every view at head compiles and can be read
        for view in insp.get_view_names():
            conn.execute(text(f"SELECT * FROM {view} LIMIT 0")).all()


def test_open_row_index_enforces_one_open_row_per_chat(bare: Engine) -> None:
    upgrade(bare)
    history = cast(Table, ChatEphemeralHistory.__table__)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def row(chat_id: str, start: int, end: int | None) -> dict[str, Any]:
        return {
            "instance_id": 1,
            "chat_id": chat_id,
            "ephemeral_expiration": 0,
            "ephemeral_setting_at": None,
            "valid_from": t0 + timedelta(hours=start),
            "valid_to": None if end is None else t0 + timedelta(hours=end),
        }

    with bare.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (id_instance, label, api_url, enabled, created_at, "
                "updated_at) VALUES (1, 'x', 'http://127.0.0.1', :t, :ts, :ts)"
            ),
            {"t": True, "ts": t0.isoformat()},
        )
        for chat_id in ("a@c.us", "b@c.us"):
            conn.execute(
                text(
                    "INSERT INTO chats (instance_id, chat_id, chat_type, name, archived, "
                    "ephemeral_expiration, first_seen_at, updated_at) "
                    "VALUES (1, :c, 'user', 'n', :f, 0, :ts, :ts)"
                ),
                {"c": chat_id, "f": False, "ts": t0.isoformat()},
            )
        # closed rows do not count: any number of them next to one open row
        conn.execute(insert(history), [row("a@c.us", 0, 1), row("a@c.us", 1, 2)])
        conn.execute(insert(history), [row("a@c.us", 2, None), row("b@c.us", 0, None)])

    with pytest.raises(IntegrityError), bare.begin() as conn:
        conn.execute(insert(history), [row("a@c.us", 3, None)])

    with bare.connect() as conn:
        open_rows = conn.execute(
            text(
                "SELECT chat_id, COUNT(*) FROM chat_ephemeral_history WHERE valid_to IS NULL "
                "GROUP BY chat_id ORDER BY chat_id"
            )
        ).all()
    assert [tuple(r) for r in open_rows] == [("a@c.us", 1), ("b@c.us", 1)]


# -- the command lines -------------------------------------------------------------------


def test_alembic_cli_and_etl_db_current_use_the_app_url(db_url: str, bare: Engine) -> None:
    # the same URL resolution as the app: ETL_DATABASE_URL, normalised for psycopg 3
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql")
    env = _env(ETL_DATABASE_URL=url.render_as_string(hide_password=False))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    up = run("-m", "alembic", "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert current_revision(bare) == head_revision()
    assert set(inspect(bare).get_table_names()) >= CORE_TABLES

    check = run("-m", "alembic", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    after = run("-m", "etl", "db", "current")
    assert after.returncode == 0, after.stderr
    assert f"current={head_revision()} head={head_revision()} (up to date)" in after.stdout

"""Engine factory, connection settings per dialect, and Alembic helpers.

What a database needs of its connections (SQLite's pragmas and BEGIN IMMEDIATE,
PostgreSQL's timeouts and keepalives) is here; the SQL a tick runs on each database is
in its store (``etl.sync.store``).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from etl.errors import DatabaseNotReady
from etl.redact import redact_url

# Alembic is imported by the functions that run it, not with this module: every command
# imports this module, Alembic (with its dialect implementations and Mako) is one of the
# largest imports there is, and a command that only checks the schema's revision
# (`etl sync --once`, started afresh each time) does not need it.
if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

#: the directory above the ``etl`` package: the repository's top level when etl is imported
#: from a checkout (editable install, tests), site-packages when it is installed from a wheel
ROOT = Path(__file__).resolve().parent.parent
#: where a wheel carries alembic.ini and migrations/ (pyproject.toml's force-include)
PACKAGED_ALEMBIC = Path(__file__).resolve().parent / "_alembic"
#: the directory holding alembic.ini and migrations/: the wheel's copy, else the checkout's
ALEMBIC_HOME = PACKAGED_ALEMBIC if (PACKAGED_ALEMBIC / "migrations").is_dir() else ROOT
ALEMBIC_INI = ALEMBIC_HOME / "alembic.ini"
MIGRATIONS = ALEMBIC_HOME / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` for psycopg 3, the driver we ship."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; we issue BEGIN IMMEDIATE ourselves (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys = ON")
    _sqlite_wal(cur)
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def _sqlite_wal(cur: sqlite3.Cursor) -> None:
    """Switch the database to WAL (a no-op when it already is), retrying while it is busy.

    Opening a WAL database can answer "database is locked" at once, without waiting on
    ``busy_timeout``, while another process opens or closes it (WAL recovery, the last
    connection's checkpoint): two ``etl sync --once`` started together hit it about once
    in fifteen runs (tests/test_outages.py::test_two_sync_once_at_the_same_moment).
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


#: execution option for read-only work (status page): on SQLite a deferred BEGIN, which
#: under WAL never blocks the writers, instead of BEGIN IMMEDIATE
READ_ONLY = "etl_read_only"


def _sqlite_begin(conn: Connection) -> None:
    try:
        _sqlite_begin_raw(conn)
    except sqlite3.Error as exc:
        # raised from an event hook, outside SQLAlchemy's own error handling: wrap it like
        # any statement's error, so that a broken file fails the tick as `database`
        raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc


def _sqlite_begin_raw(conn: Connection) -> None:
    # Take the write lock at BEGIN: two writers then queue on busy_timeout instead of
    # failing with "database is locked" when a read transaction tries to upgrade.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
        return
    # First try without waiting, so that a wait for another writer can be logged.
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    timeout = SQLITE_BUSY_TIMEOUT_MS
    try:
        timeout = cur.execute("PRAGMA busy_timeout").fetchone()[0]
        cur.execute("PRAGMA busy_timeout = 0")
        try:
            cur.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        log.info("SQLite database is locked by another writer; waiting up to %d ms", timeout)
    finally:
        cur.execute(f"PRAGMA busy_timeout = {int(timeout)}")
        cur.close()
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Connection:
    """A connection for reads that must not hold up syncs (SQLite: no write lock)."""
    return engine.connect().execution_options(**{READ_ONLY: True})


#: libpq settings so that a server that stops answering (a dead host, a network black
#: hole, a failed-over address) fails the tick instead of hanging its job for good: give
#: up connecting after 10 s, probe an idle connection after 30 s, and drop a connection
#: whose sent data stays unacknowledged for 60 s. Any of them given in the URL's query
#: string (``?connect_timeout=3``) wins.
PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def make_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, prepare_threshold: int | None = 5
) -> Engine:
    """An engine with this project's settings for SQLite or PostgreSQL.

    ``prepare_threshold``: psycopg prepares a statement on the server once it has run this
    many times (its default); None never prepares, for PgBouncer in transaction mode before
    1.21, which hands each transaction to any server connection."""
    url = normalise_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    query = make_url(url).query
    connect_args = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in query}
    connect_args["prepare_threshold"] = prepare_threshold
    return create_engine(
        url,
        echo=echo,
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


def alembic_config(url: str | None = None, connection: Connection | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    _require_migrations()
    cfg = AlembicConfig(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else AlembicConfig()
    # ConfigParser interpolation: a literal % in the path must be doubled
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    # alembic.ini's `prepend_sys_path = .` is for the `alembic` command run in a checkout;
    # here etl is imported already, and the current directory must not shadow a module
    # (nor be added to sys.path again on every call)
    cfg.set_main_option("prepend_sys_path", "")
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes["database_url"] = normalise_url(url)
    return cfg


def _require_migrations() -> None:
    if not (MIGRATIONS / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic migrations not found in {PACKAGED_ALEMBIC} (an installed wheel) "
            f"or {ROOT} (a checkout): is the chatsync package installed completely?"
        )


#: a migration script's ``revision = "0008"`` or ``down_revision = "0007"`` (or None) line
_REVISION_LINE = re.compile(
    r"""^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(?:"([^"\n]*)"|'([^'\n]*)'|None)\s*$""",
    re.MULTILINE,
)


def head_revision() -> str | None:
    """The latest revision of the migration scripts.

    Read from each script's ``revision`` and ``down_revision`` lines: Alembic would import
    itself and every script to say the same, a cost every command that checks the schema
    would pay at start-up. A history those lines do not describe as one chain (a merge, a
    branch, another form of the lines) is left to Alembic.
    """
    _require_migrations()
    revisions: set[str] = set()
    downs: set[str] = set()
    scripts = sorted((MIGRATIONS / "versions").glob("*.py"))
    for path in scripts:
        found = {
            m[1]: m[2] if m[2] is not None else m[3]
            for m in _REVISION_LINE.finditer(path.read_text(encoding="utf-8"))
        }
        if found.get("revision") is None or "down_revision" not in found:
            return _alembic_head_revision()
        revisions.add(found["revision"])
        if found["down_revision"] is not None:
            downs.add(found["down_revision"])
    heads = revisions - downs
    if len(revisions) != len(scripts) or len(heads) > 1 or not downs <= revisions:
        return _alembic_head_revision()
    return heads.pop() if heads else None


def _alembic_head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's revision (None: no schema yet), from Alembic's version table."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(versions) > 1:  # branches: Alembic says how that is an error
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(conn).get_current_revision()
    return versions[0] if versions else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), revision)


def require_current_schema(engine: Engine) -> None:
    """Raise DatabaseNotReady unless the database is at the latest revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = redact_url(engine.url.render_as_string(hide_password=False))
        state = "has no schema" if current is None else f"is at revision {current}"
        raise DatabaseNotReady(
            f"database {where} {state}, latest is {head}: run `etl db upgrade` first"
        )

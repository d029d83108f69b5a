"""The command line (thin: parse, call, print). ``etl --help`` lists the commands."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from etl import __version__
from etl.client import GreenApiClient
from etl.clock import utcnow
from etl.config import AppConfig, Instance, load_config
from etl.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    require_current_schema,
    upgrade,
)
from etl.errors import EtlError
from etl.leases import LeaseManager
from etl.logs import setup_logging
from etl.progress import ProgressLine
from etl.redact import redact, redact_url
from etl.sync import Syncer, SyncOutcome, register_instances

# What only some commands use is imported by those commands: the scheduler (APScheduler),
# the status page and metrics (http.server, prometheus_client), the status queries,
# retention, the demo and the simulator. Every command would otherwise import all of it
# before doing anything, and `etl sync --once` is a fresh process on every run.
if TYPE_CHECKING:
    from etl.metrics import Metrics
    from etl.web import Liveness, StatusServer

log = logging.getLogger("etl.cli")
F = TypeVar("F", bound=Callable[..., Any])


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # ctx.meta is shared by the group and its subcommands, so an option given before or
    # after the subcommand lands in the same place; the later one wins.
    if value is not None and param.name is not None:
        ctx.meta[f"etl.{param.name}"] = value
    return value


def global_options(f: F) -> F:
    """Options accepted both before and after the subcommand name."""
    options = [
        click.option(
            "--config",
            "config",
            metavar="PATH",
            default=None,
            expose_value=False,
            callback=_store,
            help="Config file (default: $ETL_CONFIG, else ./etl.toml).",
        ),
        click.option(
            "--database-url",
            "database_url",
            metavar="URL",
            default=None,
            expose_value=False,
            callback=_store,
            help="SQLAlchemy URL (default: $ETL_DATABASE_URL, else the config's "
            "database_url, else sqlite:///chats.db).",
        ),
        click.option(
            "--log-level",
            "log_level",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            default=None,
            expose_value=False,
            callback=_store,
            help="Log level (default INFO).",
        ),
        click.option(
            "--log-format",
            "log_format",
            type=click.Choice(["text", "json"]),
            default=None,
            expose_value=False,
            callback=_store,
            help="Log line format (default text).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _opt(name: str) -> Any:
    return click.get_current_context().meta.get(f"etl.{name}")


def _setup_logging() -> None:
    setup_logging(_opt("log_level") or "INFO", _opt("log_format") or "text")


def _load(*, instances: bool = True) -> AppConfig:
    return load_config(
        config_path=_opt("config"), database_url=_opt("database_url"), load_instances=instances
    )


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {redact(message)}", err=True)
    sys.exit(code)


class EtlGroup(click.Group):
    """Turns our own errors into one clean line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EtlError as exc:
            _fail(str(exc))
        except OperationalError as exc:  # unreachable database, bad path, ...
            detail = str(exc.orig if exc.orig is not None else exc).strip()
            _fail(f"database: {detail.splitlines()[0] if detail else type(exc).__name__}")


@click.group(cls=EtlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@click.version_option(__version__, prog_name="chatsync")
def cli() -> None:
    """chatsync: sync Green-API getChats into SQL, with the history of disappearing-message
    settings.

    \b
    Quick start:
      etl demo                 try it against the bundled simulator
      etl db upgrade           create or upgrade the schema
      etl sync --once          one pass over every configured instance
      etl run                  the daemon
    """


# -- db --------------------------------------------------------------------------------


@cli.group(cls=EtlGroup)
@global_options
def db() -> None:
    """Schema management (Alembic)."""


def _engine(cfg: AppConfig) -> Engine:
    return make_engine(cfg.database_url, prepare_threshold=cfg.database.psycopg_prepare_threshold)


@db.command("upgrade")
@global_options
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Create or upgrade the schema to REVISION (default: head)."""
    _setup_logging()
    cfg = _load(instances=False)
    engine = _engine(cfg)
    try:
        upgrade(engine, revision)
        click.echo(f"{redact_url(cfg.database_url)} is at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@db.command("downgrade")
@global_options
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION ("base" removes every table)."""
    _setup_logging()
    cfg = _load(instances=False)
    engine = _engine(cfg)
    try:
        downgrade(engine, revision)
        click.echo(f"{redact_url(cfg.database_url)} is at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@db.command("current")
@global_options
def db_current() -> None:
    """Show the database's revision and the latest one."""
    _setup_logging()
    cfg = _load(instances=False)
    engine = _engine(cfg)
    try:
        current, head = current_revision(engine), head_revision()
    finally:
        engine.dispose()
    state = "up to date" if current == head else "behind: run `etl db upgrade`"
    click.echo(f"{redact_url(cfg.database_url)}: current={current} head={head} ({state})")


@db.command("prune")
@global_options
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=None,
    help="Delete sync_runs older than this many days (default: retention.sync_runs_days).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per transaction (default: retention.batch_size).",
)
def db_prune(days: int | None, batch_size: int | None) -> None:
    """Delete old sync_runs rows now, in short batches (the daemon does it every hour)."""
    _setup_logging()
    cfg = _load(instances=False)
    days = days or cfg.retention.sync_runs_days
    if not days:
        raise EtlError("retention is off (retention.sync_runs_days = 0): pass --days N")
    from etl.retention import prune_sync_runs

    engine = _engine(cfg)
    try:
        require_current_schema(engine)
        n = prune_sync_runs(
            engine, older_than_days=days, batch_size=batch_size or cfg.retention.batch_size
        )
    finally:
        engine.dispose()
    click.echo(f"pruned {n} sync_runs rows older than {days} days")


# -- sync ------------------------------------------------------------------------------


def _prepare(cfg: AppConfig, only: Sequence[int] = ()) -> tuple[Engine, list[Instance]]:
    if not cfg.instances:
        where = cfg.source or "the config file"
        raise EtlError(f"no instances configured in {where} (see README: Configuration)")
    instances = [i for i in cfg.instances if i.enabled]
    if only:
        unknown = set(only) - {i.id_instance for i in cfg.instances}
        if unknown:
            raise EtlError(f"not in the config: {', '.join(map(str, sorted(unknown)))}")
        instances = [i for i in instances if i.id_instance in only]
    engine = make_engine(
        cfg.database_url,
        pool_size=cfg.scheduler.max_workers,
        prepare_threshold=cfg.database.psycopg_prepare_threshold,
    )
    require_current_schema(engine)
    register_instances(engine, cfg.instances)
    return engine, instances


def _start_http(
    cfg: AppConfig, engine: Engine, port: int, metrics: Metrics, liveness: Liveness
) -> StatusServer | None:
    """The status page and metrics endpoint. A port that cannot be bound (taken, say by
    another replica on the same host) is logged, and the work goes on without it."""
    from etl.web import StatusServer

    server = StatusServer(engine, metrics=metrics, liveness=liveness, host=cfg.http.host, port=port)
    try:
        server.start()
    except OSError as exc:
        log.error(
            "http: cannot listen on %s:%s (%s); running without the status page and metrics",
            cfg.http.host,
            port,
            exc.strerror or exc,
        )
        return None
    return server  # it logs its URL


def _print_outcomes(outcomes: Sequence[SyncOutcome]) -> None:
    header = f"{'instance':>12}  {'status':8} {'kind':16} {'recv':>6} {'new':>5} {'upd':>5} "
    header += f"{'rem':>5} {'rej':>4} {'eph':>4} {'try':>3} {'ms':>6}"
    click.echo(header)
    for o in outcomes:
        click.echo(
            f"{o.instance_id:>12}  {o.status:8} {o.error_kind or '-':16} {o.chats_received:>6} "
            f"{o.chats_inserted:>5} {o.chats_updated:>5} {o.chats_removed:>5} "
            f"{o.chats_rejected:>4} {o.ephemeral_changes:>4} {o.attempts:>3} {o.duration_ms:>6}"
        )
        if o.error:
            click.echo(f"{'':>14}{redact(o.error)}")


@cli.command("sync")
@global_options
@click.option("--once", is_flag=True, help="One pass over every enabled instance, then exit.")
@click.option("--instance", "only", type=int, multiple=True, help="Only this id (repeatable).")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Parallel syncs (default: config)."
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the status page and /metrics on this port during the pass (default: off).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A live 'synced X/N' line on stderr (default: when stderr is a terminal).",
)
def sync_cmd(
    once: bool,
    only: tuple[int, ...],
    workers: int | None,
    http_port: int | None,
    progress: bool | None,
) -> None:
    """Sync every configured instance once.

    Exit status: 0 when every instance ended ok or anomaly, 1 when any failed.
    """
    if not once:
        raise click.UsageError("use `etl sync --once` for one pass, or `etl run` for the daemon")
    _setup_logging()
    cfg = _load()
    engine, instances = _prepare(cfg, only)
    client = GreenApiClient(pool_maxsize=workers or cfg.scheduler.max_workers)
    # one tick per instance: its snapshot is written for the next process to start from;
    # packed, since the tick packs it to write it anyway
    syncer = Syncer(engine, client, compact_snapshots=True)
    line = ProgressLine(len(instances), sys.stderr, enabled=progress)
    syncer.listeners.append(line.listener)
    web: StatusServer | None = None
    try:
        if http_port is not None:
            from etl.metrics import Metrics

            metrics = Metrics(per_instance=cfg.http.per_instance_metrics)
            metrics.attach(syncer)
            metrics.set_instances(len(instances))
            web = _start_http(cfg, engine, http_port, metrics, lambda: (True, "sync --once"))
        syncer.preload_ahead(instances)
        with line, ThreadPoolExecutor(max_workers=workers or cfg.scheduler.max_workers) as pool:
            outcomes = list(pool.map(syncer.sync, instances))
    finally:
        if web is not None:
            web.stop()
        client.close()
        engine.dispose()
    _print_outcomes(outcomes)
    sys.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


@cli.command("run")
@global_options
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Thread pool size (default: config).",
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the status page and /metrics (default: [http] port, 8000; 0: any free).",
)
@click.option("--no-http", is_flag=True, help="Do not serve the status page and /metrics.")
def run_cmd(workers: int | None, http_port: int | None, no_http: bool) -> None:
    """Run the daemon: every enabled instance every interval until SIGTERM/SIGINT."""
    from etl.metrics import Metrics
    from etl.scheduler import Daemon
    from etl.status import instance_status

    _setup_logging()
    cfg = _load()
    engine, instances = _prepare(cfg)
    max_workers = workers or cfg.scheduler.max_workers
    client = GreenApiClient(pool_maxsize=max_workers)
    http = not no_http and (cfg.http.enabled or http_port is not None)
    metrics = Metrics(per_instance=cfg.http.per_instance_metrics) if http else None
    leases = LeaseManager(
        engine,
        instances,
        heartbeat_seconds=cfg.scheduler.heartbeat_seconds,
        lease_seconds=cfg.scheduler.lease_seconds,
    )
    daemon = Daemon(
        syncer=Syncer(
            engine,
            client,
            compact_snapshots=cfg.scheduler.compact_snapshots,
            persist_every=cfg.scheduler.persist_every_ticks,
        ),
        instances=instances,
        leases=leases,
        max_workers=max_workers,
        shutdown_timeout=cfg.scheduler.shutdown_timeout_seconds,
        persist_on_release=cfg.scheduler.persist_on_release,
        metrics=metrics,
        retention=cfg.retention,
    )
    web: StatusServer | None = None
    if metrics is not None:
        try:
            metrics.seed(instance_status(engine, chats={}))  # no need to count chats
        except SQLAlchemyError as exc:
            log.warning("could not read the last syncs for metrics: %s", type(exc).__name__)
        port = http_port if http_port is not None else cfg.http.port
        web = _start_http(cfg, engine, port, metrics, daemon.liveness)
    log.info(
        "chatsync %s: %d instances into %s",
        __version__,
        len(instances),
        redact_url(cfg.database_url),
    )
    try:
        clean = daemon.run_forever()
    finally:
        if web is not None:
            web.stop()
        client.close()
        engine.dispose()
    if not clean:
        # Syncs still running after shutdown_timeout_seconds: their worker threads are not
        # daemonic, so a normal exit would wait for them anyway. Leave now: whatever they
        # have not committed rolls back.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
    sys.exit(0)


# -- status ----------------------------------------------------------------------------


def _plain(value: str, width: int) -> str:
    """One line of at most ``width`` printable characters (labels and errors are data)."""
    text_ = "".join(ch if ch.isprintable() else " " for ch in value)
    return text_ if len(text_) <= width else text_[: width - 1] + "…"


@cli.command("status")
@global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
def status_cmd(as_json: bool) -> None:
    """Show each instance's latest sync, chats and failures, read from the database."""
    from etl.status import ago, format_ms, instance_status, state, status_document, summary

    _setup_logging()
    cfg = _load(instances=False)
    engine = _engine(cfg)
    try:
        require_current_schema(engine)
        if as_json:
            click.echo(json.dumps(status_document(engine), indent=1))
            return
        statuses = instance_status(engine)
    finally:
        engine.dispose()
    now = utcnow()
    click.echo(
        f"{'instance':>12}  {'label':24} {'status':8} {'last sync':12} {'last success':12} "
        f"{'chats':>7} {'fails':>5} {'duration':>9}  last error"
    )
    for s in statuses:
        error = " ".join(p for p in (s.last_error_kind, s.last_error) if p)
        click.echo(
            f"{s.instance_id:>12}  {_plain(s.label, 24):24} {state(s):8} "
            f"{ago(s.last_run_at, now):12} {ago(s.last_success_at, now):12} "
            f"{s.chats:>7} {s.consecutive_failures:>5} {format_ms(s.last_duration_ms):>9}  "
            f"{_plain(redact(error), 60) if error else '-'}"
        )
        if state(s) in ("failed", "anomaly"):  # not for a disabled instance
            if s.last_instance_state:
                click.echo(f"{'':>14}instance state: {_plain(s.last_instance_state, 40)}")
            if s.last_action:
                click.echo(f"{'':>14}what to do: {s.last_action}")
    n = summary(statuses)
    click.echo(
        f"{n['instances']} instances: {n['ok']} ok, {n['anomaly']} anomaly, "
        f"{n['failed']} failed, {n['never']} not synced yet, {n['disabled']} disabled"
    )


# -- simulator and demo ----------------------------------------------------------------


@cli.command("simulate")
@global_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free).")
@click.option("--instances", type=int, default=5, show_default=True)
@click.option("--chats", type=int, default=200, show_default=True, help="Chats per instance.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--token", default=None, help="Token every instance accepts (default: derived).")
@click.option(
    "--tick-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Evolve the chats (renames, ephemeral changes, ...) this often; 0 = never.",
)
@click.option("--interval", type=int, default=60, show_default=True, help="For the config.")
@click.option(
    "--platform",
    type=click.Choice(["whatsapp", "telegram", "max"]),
    default="whatsapp",
    show_default=True,
    help="The messenger every instance serves (its getChats elements).",
)
@click.option(
    "--lid-switch-at-step",
    type=click.IntRange(min=0),
    default=None,
    help="From this step on, every instance is in LID mode: person chats are @lid.",
)
@click.option(
    "--check-quota",
    type=click.IntRange(min=0),
    default=None,
    help="checkWhatsapp requests each instance may make, then 466 (default: no limit).",
)
def simulate_cmd(
    host: str,
    port: int,
    instances: int,
    chats: int,
    seed: int,
    token: str | None,
    tick_seconds: float,
    interval: int,
    platform: str,
    lid_switch_at_step: int | None,
    check_quota: int | None,
) -> None:
    """Serve a Green-API simulator on loopback and print a config for it."""
    from etl.simulator import Simulator

    _setup_logging()
    sim = Simulator(
        instances=instances,
        chats=chats,
        seed=seed,
        token=token,
        host=host,
        port=port,
        tick_seconds=tick_seconds or None,
        platform=platform,
        lid_switch_at_step=lid_switch_at_step,
        check_quota=check_quota,
    )
    sim.start()
    click.echo(f"# Green-API simulator on {sim.url}: save this as etl.toml, then `etl sync --once`")
    click.echo(sim.config_toml(interval_seconds=interval))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()


@cli.command("demo")
@global_options
@click.option("--instances", type=int, default=3, show_default=True)
@click.option("--chats", type=int, default=40, show_default=True, help="Chats per instance.")
@click.option("--ticks", type=int, default=3, show_default=True, help="Syncs per instance.")
@click.option("--interval", type=int, default=2, show_default=True, help="Seconds per tick.")
def demo_cmd(instances: int, chats: int, ticks: int, interval: int) -> None:
    """Run the real scheduler against the bundled simulator into SQLite, then show the data.

    Uses sqlite:///chats-demo.db (recreated) unless --database-url is given; never the
    database of $ETL_DATABASE_URL or the config file.
    """
    from etl.demo import run_demo

    setup_logging(_opt("log_level") or "WARNING", _opt("log_format") or "text")
    run_demo(
        instances=instances,
        chats=chats,
        ticks=ticks,
        interval=interval,
        database_url=_opt("database_url"),
        echo=click.echo,
    )


# the `etl ids` commands live apart, and use this module's options and helpers
from etl.cli_ids import ids  # noqa: E402

cli.add_command(ids)


def main() -> None:
    cli(prog_name="etl")

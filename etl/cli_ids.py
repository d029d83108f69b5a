"""``etl ids``: chat ids that changed form (``@c.us`` and ``@lid``), linked by hand or an
id switch accepted (``etl.ids``). Registered on ``etl.cli.cli``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy import Engine

from etl.cli import EtlGroup, _engine, _load, _plain, _setup_logging, global_options
from etl.clock import utcnow
from etl.config import AppConfig
from etl.db import require_current_schema
from etl.ids import accept_switch, link_ids, linked_ids, read_pairs


@click.group(cls=EtlGroup)
@global_options
def ids() -> None:
    """Chat ids that changed form (@c.us and @lid): link them, or accept a switch."""


def _ids_engine() -> tuple[AppConfig, Engine]:
    _setup_logging()
    cfg = _load(instances=False)
    engine = _engine(cfg)
    require_current_schema(engine)
    return cfg, engine


@ids.command("link")
@global_options
@click.option("--instance", "instance_id", type=int, required=True, help="The instance's id.")
@click.argument("csv_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def ids_link(instance_id: int, csv_file: Path) -> None:
    """Link chat ids from FILE (CSV: old_id,new_id per line): the chat stored under old_id
    is the one the API now names new_id. The next tick applies the links."""
    pairs = read_pairs(csv_file)
    _cfg, engine = _ids_engine()
    try:
        report = link_ids(engine, instance_id, pairs, now=utcnow())
    finally:
        engine.dispose()
    click.echo(f"instance {instance_id}: {report.linked} of {len(pairs)} ids linked")
    for line in report.skipped:
        click.echo(f"  not linked: {_plain(line, 200)}")
    if report.skipped:
        sys.exit(1)


@ids.command("accept")
@global_options
@click.option("--instance", "instance_id", type=int, required=True, help="The instance's id.")
def ids_accept(instance_id: int) -> None:
    """Accept an id switch that could not be linked: the next tick records the chats that
    vanished as removed and the new ids as new chats."""
    _cfg, engine = _ids_engine()
    try:
        accept_switch(engine, instance_id, now=utcnow())
    finally:
        engine.dispose()
    click.echo(f"instance {instance_id}: its next tick applies the id switch as it is")


@ids.command("list")
@global_options
@click.option("--instance", "instance_id", type=int, required=True, help="The instance's id.")
def ids_list(instance_id: int) -> None:
    """The instance's chats known by other ids: alias, chat, where the link came from."""
    _cfg, engine = _ids_engine()
    try:
        rows = linked_ids(engine, instance_id)
    finally:
        engine.dispose()
    for alias, chat, source in rows:
        click.echo(f"{_plain(alias, 60)},{_plain(chat, 60)},{source}")

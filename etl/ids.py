"""The operator's side of an id switch: link chat ids by hand, or accept a switch.

When an instance's chat ids change form (``@c.us`` to ``@lid`` or back) and Green-API
cannot give every link (checkWhatsapp off, out of quota, failing), the sync holds the
instance's ticks as an ``id_switch`` anomaly (``etl.sync.identity``). Then either:

* ``link_ids``: pairs of (an id the chat was stored under, the id it has now), from a CSV
  file, become aliases; the next tick finds the chats under their new ids;
* ``accept_switch``: the next tick applies the switch as it looks, the unlinked chats as
  removed and the new ids as new chats.

Both take the instance's lock and bump its state version, as a tick does, so that a
running daemon rereads the instance before its next tick.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, select, update

from etl.errors import EtlError
from etl.models import aliases_t, chats_t, instances_t, state_t
from etl.payload import normalise_chat_id
from etl.sync.store import store_for


@dataclass(slots=True)
class LinkReport:
    linked: int = 0
    #: the pairs not linked, each with the reason
    skipped: list[str] = field(default_factory=list)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """``old_id,new_id`` per line (a header line naming them is skipped; blank lines and
    lines starting with ``#`` too)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise EtlError(f"cannot read {path}: {exc.strerror}") from None
    pairs: list[tuple[str, str]] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) != 2:
            raise EtlError(f"{path}:{number}: expected two columns, old_id,new_id")
        if number == 1 and cells[0].lower() in ("old_id", "old", "from"):
            continue
        pairs.append((cells[0], cells[1]))
    return pairs


def _normalised(value: str, platform: str) -> str:
    if platform != "whatsapp":
        return value
    try:
        return normalise_chat_id(value)
    except ValueError as exc:
        raise EtlError(f"{value!r}: {exc}") from None


def _platform(engine: Engine, instance_id: int) -> str:
    with engine.connect() as conn:
        platform = conn.execute(
            select(instances_t.c.platform).where(instances_t.c.id_instance == instance_id)
        ).scalar()
    if platform is None:
        raise EtlError(f"instance {instance_id} is not in the database (run a sync first)")
    return str(platform)


def link_ids(
    engine: Engine, instance_id: int, pairs: list[tuple[str, str]], *, now: datetime
) -> LinkReport:
    """Store each (old id, new id) pair as an alias of the chat ``old id`` names (its own
    id, or an id it is known by). A new id that is a chat of its own, or already names
    another chat, is not linked: a link never merges two stored chats."""
    platform = _platform(engine, instance_id)
    report = LinkReport()
    store = store_for(engine.dialect.name)
    with engine.begin() as conn:
        store.lock(conn, instance_id, now, None, None)
        identity = store.load_identity(conn, instance_id)
        stored = set(
            conn.execute(select(chats_t.c.chat_id).where(chats_t.c.instance_id == instance_id))
            .scalars()
            .all()
        )
        rows = []
        for old_raw, new_raw in pairs:
            old, new = _normalised(old_raw, platform), _normalised(new_raw, platform)
            chat = old if old in stored else identity.aliases.get(old)
            if chat is None:
                report.skipped.append(f"{old} -> {new}: {old} is not a stored chat")
            elif new in stored:
                report.skipped.append(f"{old} -> {new}: {new} is a chat of its own")
            elif identity.aliases.get(new, chat) != chat:
                other = identity.aliases[new]
                report.skipped.append(f"{old} -> {new}: {new} already names {other}")
            else:
                identity.aliases[new] = chat
                rows.append(
                    {
                        "instance_id": instance_id,
                        "alias_id": new,
                        "chat_id": chat,
                        "source": "operator",
                        "linked_at": now,
                    }
                )
        if rows:
            # numbered like a tick's rows: incremental loads, and a stale snapshot's
            # top-up (``Snapshot.topped_up``), find what changed by ``change_seq``
            seq = store.change_seq(conn)
            conn.execute(store.upsert_aliases.values(change_seq=seq), rows)
        report.linked = len(rows)
    return report


def accept_switch(engine: Engine, instance_id: int, *, now: datetime) -> None:
    """Let the next tick of the instance apply an id switch that could not be linked."""
    _platform(engine, instance_id)
    store = store_for(engine.dialect.name)
    with engine.begin() as conn:
        store.lock(conn, instance_id, now, None, None)
        conn.execute(
            update(state_t)
            .where(state_t.c.instance_id == instance_id)
            .values(id_switch_accepted_at=now, updated_at=now)
        )


def linked_ids(engine: Engine, instance_id: int) -> list[tuple[str, str, str]]:
    """(alias, chat, source) of an instance, sorted."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(aliases_t.c.alias_id, aliases_t.c.chat_id, aliases_t.c.source)
            .where(aliases_t.c.instance_id == instance_id)
            .order_by(aliases_t.c.chat_id, aliases_t.c.alias_id)
        ).all()
    return [(r.alias_id, r.chat_id, r.source) for r in rows]

"""The configured instances, mirrored into the ``instances`` table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Engine, insert, select, update

from etl.clock import utcnow
from etl.config import Instance
from etl.models import instances_t
from etl.sync.store import store_for


def register_instances(
    engine: Engine, instances: Sequence[Instance], *, now: datetime | None = None
) -> None:
    """Mirror the configured instances into ``instances``; drop-outs become ``enabled = false``."""
    now = now or utcnow()
    configured = {i.id_instance for i in instances}
    with engine.begin() as conn:
        store = store_for(conn.dialect.name)
        store.lock_registry(conn)
        seq = store.change_seq(conn)
        stored = {
            r.id_instance: r
            for r in conn.execute(
                select(
                    instances_t.c.id_instance,
                    instances_t.c.label,
                    instances_t.c.api_url,
                    instances_t.c.enabled,
                    instances_t.c.platform,
                )
            )
        }
        new_rows = []
        for inst in instances:
            row = stored.get(inst.id_instance)
            values = {
                "label": inst.label,
                "api_url": inst.api_url,
                "enabled": inst.enabled,
                "platform": inst.platform,
            }
            if row is None:
                new_rows.append(
                    {"id_instance": inst.id_instance, "created_at": now, "updated_at": now} | values
                )
            elif (row.label, row.api_url, row.enabled, row.platform) != tuple(values.values()):
                conn.execute(
                    update(instances_t)
                    .where(instances_t.c.id_instance == inst.id_instance)
                    .values(updated_at=now, change_seq=seq, **values)
                )
        if new_rows:
            conn.execute(insert(instances_t).values(change_seq=seq), new_rows)
        gone = [i for i, r in stored.items() if i not in configured and r.enabled]
        if gone:
            conn.execute(
                update(instances_t)
                .where(instances_t.c.id_instance.in_(gone))
                .values(enabled=False, updated_at=now, change_seq=seq)
            )

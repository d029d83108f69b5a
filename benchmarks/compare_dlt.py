"""The same simulator data loaded by chatsync and by dlt's scd2 merge, side by side.

    pip install -e '.[bench]'
    python benchmarks/compare_dlt.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --instances 1000 --chats 500 --ticks 3

The baseline a user would otherwise pick: a dlt pipeline whose resource yields every
instance's chats (with an ``instance_id`` column) each tick, loaded with
``write_disposition={"disposition": "merge", "strategy": "scd2"}`` and
``merge_key="instance_id"`` (so a chat missing from its instance's list is retired, and
instances absent from a load are left alone) into PostgreSQL.

Both sides get the same thing: the simulator (its own process, as in ``fleet.py``), the
same ``GreenApiClient`` and thread pool (``--workers``) for the fetches, the same
``decode_chats`` validation, the same PostgreSQL server (each in a throwaway database of its
own, dropped at the end), and the same ticks: for every tick the simulator state is frozen
while chatsync syncs it, then dlt loads it (and, unless ``--no-floor``, the floor of
``fleet.py`` fetches and decodes it first). Times include the fetches on both sides.

dlt's time is the whole ``pipeline.run``: extract (our fetch + decode, then dlt writes the
rows to its extract files), normalize (schema inference, row hashes for scd2, load files)
and load (COPY/INSERT into a staging dataset, then the scd2 merge SQL); the per-step times
are in each tick line (``dlt_steps_s``).

Output: one JSON line per pass and a summary line with ``dlt / chatsync`` ratios for the
cold start (first tick, empty databases) and the steady ticks (median of the per-tick
pairs). dlt is only a benchmark dependency (the ``bench`` extra), never a runtime one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet  # noqa: E402  (benchmarks/fleet.py)

from etl.client import GreenApiClient  # noqa: E402
from etl.config import Instance  # noqa: E402
from etl.db import make_engine, upgrade  # noqa: E402
from etl.payload import decode_chats  # noqa: E402
from etl.sync import Syncer, register_instances  # noqa: E402


def dlt_rows(
    pool: ThreadPoolExecutor, client: GreenApiClient, instances: list[Instance]
) -> Iterator[list[dict[str, Any]]]:
    """Fetch and decode every instance exactly as the sync does; one list of rows per
    instance (dlt batches lists natively)."""

    def fetch(instance: Instance) -> list[dict[str, Any]]:
        decoded = decode_chats(client.get_chats(instance).body)
        iid = instance.id_instance
        return [
            {
                "instance_id": iid,
                "chat_id": c.chat_id,
                "chat_type": c.chat_type,
                "name": c.name,
                "archived": c.archived,
                "ephemeral_expiration": c.ephemeral_expiration or 0,
                "ephemeral_setting_at": c.ephemeral_setting_at,
            }
            for c in decoded.chats
        ]

    yield from pool.map(fetch, instances)


COLUMNS = {
    "instance_id": {"data_type": "bigint", "nullable": False},
    "chat_id": {"data_type": "text", "nullable": False},
    "chat_type": {"data_type": "text"},
    "name": {"data_type": "text"},
    "archived": {"data_type": "bool"},
    "ephemeral_expiration": {"data_type": "bigint"},
    "ephemeral_setting_at": {"data_type": "timestamp", "timezone": True},
}


def make_pipeline(url: str, workdir: str, args: argparse.Namespace) -> Any:
    # dlt reads its settings from the environment; no telemetry (no network here).
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ["NORMALIZE__WORKERS"] = str(args.dlt_normalize_workers)
    os.environ["LOAD__WORKERS"] = str(args.dlt_load_workers)
    os.environ["DATA_WRITER__BUFFER_MAX_ITEMS"] = str(args.dlt_buffer_max_items)
    import dlt

    u = fleet.make_url(url).set(drivername="postgresql")
    if u.password is None:  # dlt insists on one; a trust/peer server ignores it
        u = u.set(password="unused")
    return dlt.pipeline(
        pipeline_name="chatsync_dlt_bench",
        pipelines_dir=workdir,
        destination=dlt.destinations.postgres(credentials=u.render_as_string(hide_password=False)),
        dataset_name="chats_scd2",
        progress="log" if args.dlt_progress else None,
    )


def dlt_resource(rows: Iterator[list[dict[str, Any]]]) -> Any:
    import dlt

    return dlt.resource(
        rows,
        name="chats",
        write_disposition={"disposition": "merge", "strategy": "scd2"},
        merge_key="instance_id",
        columns=COLUMNS,
    )


def set_work_mem(url: str, work_mem: str) -> None:
    """Give dlt's database a work_mem that fits its merge: the scd2 SQL retires rows with
    ``_dlt_id NOT IN (SELECT _dlt_id FROM staging)``, which PostgreSQL runs as a hashed
    subplan only when the hash fits in work_mem; past that (the 4MB default is far too
    small for 500,000 ids) it rescans the subquery per row and a tick takes hours."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
            value = conn.execute(text("SELECT quote_literal(:v)"), {"v": work_mem}).scalar_one()
            conn.execute(text(f'ALTER DATABASE "{name}" SET work_mem = {value}'))
    finally:
        eng.dispose()


def dlt_step_times(pipeline: Any) -> dict[str, float]:
    trace = pipeline.last_trace
    out: dict[str, float] = {}
    for step in getattr(trace, "steps", []) or []:
        if step.started_at and step.finished_at:
            out[step.step] = round((step.finished_at - step.started_at).total_seconds(), 3)
    return out


def dlt_table_rows(url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM chats_scd2.chats")).scalar_one()
            current = conn.execute(
                text("SELECT count(*) FROM chats_scd2.chats WHERE _dlt_valid_to IS NULL")
            ).scalar_one()
        return {"rows": int(total), "current_rows": int(current)}
    finally:
        eng.dispose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = fleet.tick_plan(args.ticks, no_change=False)
    common = {
        "instances": args.instances,
        "chats": args.chats,
        "workers": args.workers,
        "change_rate": args.change_rate,
        "dlt_loader_file_format": args.dlt_format,
        "dlt_work_mem": args.dlt_work_mem or None,
    }
    if args.log_level:
        fleet.setup_daemon_logging(args.log_level, args.log_file)
    pairs: dict[str, list[dict[str, Any]]] = {"cold": [], "steady": []}
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(
            fleet.SimProcess(
                instances=args.instances,
                chats=args.chats,
                seed=args.seed,
                change_rate=args.change_rate,
            )
        )
        instances = fleet.make_instances(sim)
        client = GreenApiClient(pool_maxsize=args.workers)
        stack.callback(client.close)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=args.workers))
        ours_url = stack.enter_context(fleet.scratch_database(args.database_url))
        dlt_url = stack.enter_context(fleet.scratch_database(args.database_url))
        if args.dlt_work_mem:
            set_work_mem(dlt_url, args.dlt_work_mem)
        engine = make_engine(ours_url, pool_size=args.workers)
        stack.callback(engine.dispose)
        upgrade(engine)
        counter = fleet.SqlCounter()
        counter.attach(engine)
        register_instances(engine, instances)
        syncer = Syncer(engine, client)
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsync-dlt-"))
        pipeline = make_pipeline(dlt_url, workdir, args)
        runner = fleet.Pass(sim, pool, instances, engine, counter)
        sim.prepare()
        for number, phase in enumerate(plan):
            if phase == "steady":
                sim.step(1)
            tick: dict[str, Any] = {"tick": number, "phase": phase}
            if not args.no_floor:
                line, decoded = runner.run("floor", fleet.floor_work(client))
                tick["floor_wall_s"] = line["wall_s"]
                fleet.emit({"type": "tick", "system": "floor", **tick, **common, **line})
            line, outcomes = runner.run("db", syncer.sync)
            line["changes"], line["statuses"] = fleet.summarise_outcomes(outcomes)
            tick["chatsync_wall_s"] = line["wall_s"]
            fleet.emit({"type": "tick", "system": "chatsync", **tick, **common, **line})

            requests0 = sim.requests()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            info = pipeline.run(
                dlt_resource(dlt_rows(pool, client, instances)),
                loader_file_format=args.dlt_format,
            )
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            tick["dlt_wall_s"] = round(wall, 4)
            dlt_line = {
                "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4),
                "http_requests": sim.requests() - requests0,
                "dlt_steps_s": dlt_step_times(pipeline),
                "dlt_table": dlt_table_rows(dlt_url),
                "load_failed": bool(info.has_failed_jobs),
                "peak_rss_mb": round(fleet.peak_rss_mb(), 1),
            }
            fleet.emit({"type": "tick", "system": "dlt", **tick, **common, **dlt_line})
            pairs[phase].append(tick)
    summary = summarise(pairs, common)
    fleet.emit(summary)
    return summary


def summarise(pairs: dict[str, list[dict[str, Any]]], common: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "summary", **common}
    for phase, ticks in pairs.items():
        if not ticks:
            continue
        entry: dict[str, Any] = {"ticks": len(ticks)}
        for key in ("floor_wall_s", "chatsync_wall_s", "dlt_wall_s"):
            values = [t[key] for t in ticks if key in t]
            if values:
                entry[key] = round(statistics.median(values), 4)
        entry["dlt_over_chatsync"] = round(
            statistics.median(t["dlt_wall_s"] / t["chatsync_wall_s"] for t in ticks), 2
        )
        if all("floor_wall_s" in t for t in ticks):
            entry["chatsync_over_floor"] = round(
                statistics.median(t["chatsync_wall_s"] / t["floor_wall_s"] for t in ticks), 3
            )
            entry["dlt_over_floor"] = round(
                statistics.median(t["dlt_wall_s"] / t["floor_wall_s"] for t in ticks), 3
            )
        out[phase] = entry
    goals = {}
    if "steady" in out:
        goals["steady_ge_10x_faster_than_dlt"] = out["steady"]["dlt_over_chatsync"] >= 10
    if "cold" in out:
        goals["cold_ge_3x_faster_than_dlt"] = out["cold"]["dlt_over_chatsync"] >= 3
    out["goals"] = goals
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="chatsync vs dlt scd2 on the same simulator data and PostgreSQL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("ETL_BENCH_DATABASE_URL"),
        required=os.environ.get("ETL_BENCH_DATABASE_URL") is None,
        help="PostgreSQL server URL; two throwaway databases are created on it and dropped",
    )
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--chats", type=int, default=500)
    p.add_argument("--ticks", type=int, default=3, help="steady-state ticks after the cold one")
    p.add_argument("--change-rate", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-floor", action="store_true", help="skip the fetch+decode floor pass")
    p.add_argument(
        "--dlt-format",
        default="csv",
        choices=["insert_values", "csv"],
        help="dlt loader file format for PostgreSQL (csv = COPY, its fastest load)",
    )
    p.add_argument("--dlt-normalize-workers", type=int, default=2)
    p.add_argument("--dlt-load-workers", type=int, default=20)
    p.add_argument("--dlt-buffer-max-items", type=int, default=100_000)
    p.add_argument(
        "--dlt-work-mem",
        default="256MB",
        help="work_mem for dlt's database (its scd2 merge needs it; '' = server default)",
    )
    p.add_argument("--dlt-progress", action="store_true")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-file", default=os.devnull)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import dlt  # noqa: F401
    except ImportError:
        raise SystemExit("dlt is not installed: pip install -e '.[bench]'") from None
    if fleet.make_url(fleet.normalise_url(args.database_url)).get_backend_name() != "postgresql":
        raise SystemExit("compare_dlt.py needs a PostgreSQL --database-url")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

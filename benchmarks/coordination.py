"""What coordinating several replicas costs: R `etl run` replicas sharing N instances,
against one process holding all N, on the same PostgreSQL and the same simulator.

    python benchmarks/coordination.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --instances 30000 --replicas 3 --interval 300 --warmup 420 --window 300

Each mode (``single``: one process; ``replicas``: R processes) gets a scratch database of
its own and runs the real daemon (``python -m etl run``) against ``etl simulate`` running in
a process of its own, with tiny chat lists so that the syncs themselves cost little and the
coordination shows. After ``--warmup`` seconds (every instance's first load done), it
measures over ``--window`` seconds:

- ``cpu_s``: CPU seconds (user + system) of each daemon process;
- ``syncs``: the ticks each wrote (``chatsync_syncs_total``, its /metrics);
- ``lease_statements``: the statements each spent coordinating, by kind
  (``chatsync_lease_statements_total``), per minute;
- ``db_transactions``: the scratch database's commits (``pg_stat_database``), per minute.

The summary line compares CPU per sync of the replicas with the single process: what
coordination adds. Output: one JSON line per mode, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing the package itself
    sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from benchmarks.fleet import proc_cpu_seconds, proc_rss_mb, scratch_database  # noqa: E402
from etl.db import make_engine, upgrade  # noqa: E402

_METRIC = re.compile(r"^(chatsync_\w+?)(?:\{([^}]*)\})? ([0-9.e+-]+)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_simulator(instances: int, chats: int, interval: int, workdir: Path) -> tuple[Any, Path]:
    """``etl simulate`` in a process of its own; returns it and the config it printed."""
    port = _free_port()
    out = workdir / "simulate.toml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "simulate", "--instances", str(instances), "--chats",
         str(chats), "--port", str(port), "--interval", str(interval), "--tick-seconds", "0"],
        stdout=out.open("wb"), stderr=subprocess.DEVNULL, cwd=workdir,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text_ = out.read_text(encoding="utf-8", errors="replace")
        if text_.count("[[instances]]") == instances:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the simulator did not print its config")
    time.sleep(1.0)
    config = workdir / "etl.toml"
    config.write_text(text_, encoding="utf-8")
    config.chmod(0o600)
    return proc, config


def scrape(port: int) -> dict[str, float]:
    """The daemon's chatsync_* samples, keyed ``name{labels}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = _METRIC.match(line)
        if m:
            out[f"{m.group(1)}{{{m.group(2) or ''}}}"] = float(m.group(3))
    return out


def _sum(sample: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in sample.items() if k.startswith(prefix))


_COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


def _commits(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(_COMMITS)).scalar_one())
    finally:
        engine.dispose()


def run_mode(
    name: str, n: int, url: str, config: Path, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    ports = [_free_port() for _ in range(n)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "etl",
                "--config",
                str(config),
                "--database-url",
                url,
                "--log-level",
                "WARNING",
                "run",
                "--workers",
                str(args.workers),
                "--http-port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / f"{name}-{i}.log").open("wb"),
        )  # fmt: skip
        for i, port in enumerate(ports)
    ]
    try:
        time.sleep(args.warmup)
        before = [scrape(p) for p in ports]
        cpu0 = [proc_cpu_seconds(p.pid) for p in procs]
        commits0 = _commits(url)
        t0 = time.monotonic()
        time.sleep(args.window)
        elapsed = time.monotonic() - t0
        after = [scrape(p) for p in ports]
        cpu1 = [proc_cpu_seconds(p.pid) for p in procs]
        commits1 = _commits(url)
        rss = [proc_rss_mb(p.pid) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    per_minute = 60 / elapsed
    replicas = []
    for b, a, c0, c1, r in zip(before, after, cpu0, cpu1, rss, strict=True):
        kinds = {
            k.split('"')[1]: (a[k] - b.get(k, 0)) * per_minute
            for k in a
            if k.startswith("chatsync_lease_statements_total")
        }
        replicas.append(
            {
                "cpu_s": round(c1 - c0, 2),
                "syncs": int(_sum(a, "chatsync_syncs_total") - _sum(b, "chatsync_syncs_total")),
                "owned": int(a.get("chatsync_instances_owned{}", 0)),
                "lease_statements_per_min": {k: round(v, 1) for k, v in sorted(kinds.items())},
                "rss_mb": round(r, 1),
            }
        )
    return {
        "type": "mode",
        "mode": name,
        "processes": n,
        "instances": args.instances,
        "interval_s": args.interval,
        "window_s": round(elapsed, 1),
        "replicas": replicas,
        "cpu_s": round(sum(r["cpu_s"] for r in replicas), 2),
        "syncs": sum(r["syncs"] for r in replicas),
        "lease_statements_per_min": round(
            sum(sum(r["lease_statements_per_min"].values()) for r in replicas), 1
        ),
        "db_transactions_per_min": round((commits1 - commits0) * per_minute, 1),
    }


def summarise(single: dict[str, Any], spread: dict[str, Any]) -> dict[str, Any]:
    per_sync = [m["cpu_s"] / max(1, m["syncs"]) * 1000 for m in (single, spread)]
    return {
        "type": "summary",
        "cpu_ms_per_sync_single": round(per_sync[0], 3),
        "cpu_ms_per_sync_replicas": round(per_sync[1], 3),
        "coordination_cpu_overhead": round(per_sync[1] / per_sync[0] - 1, 4),
        "lease_statements_per_min_single": single["lease_statements_per_min"],
        "lease_statements_per_min_replicas": spread["lease_statements_per_min"],
        "syncs_per_min_single": round(single["syncs"] * 60 / single["window_s"], 1),
        "syncs_per_min_replicas": round(spread["syncs"] * 60 / spread["window_s"], 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", required=True, help="a PostgreSQL server (scratch dbs)")
    p.add_argument("--instances", type=int, default=30_000)
    p.add_argument("--chats", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--interval", type=int, default=300)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--warmup", type=float, default=420.0, help="seconds before measuring")
    p.add_argument("--window", type=float, default=300.0, help="seconds measured")
    p.add_argument("--modes", default="single,replicas", help="which modes, in order")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chatsync-coord-") as tmp:
        workdir = Path(tmp)
        sim, config = start_simulator(args.instances, args.chats, args.interval, workdir)
        try:
            for mode in args.modes.split(","):
                n = 1 if mode == "single" else args.replicas
                with scratch_database(args.database_url) as url:
                    engine = make_engine(url)
                    upgrade(engine)
                    engine.dispose()
                    results[mode] = run_mode(mode, n, url, config, workdir, args)
                print(json.dumps(results[mode]), flush=True)
        finally:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
    if "single" in results and "replicas" in results:
        print(json.dumps(summarise(results["single"], results["replicas"])), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("ETL_CONFIG", None)
    sys.exit(main())

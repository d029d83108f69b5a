#!/usr/bin/env python3
"""Soak test: the real daemon against a faulty simulator for a long time; resources stay flat.

Starts the Green-API simulator in this process (``--instances`` instances whose lists keep
changing), runs ``python -m etl run`` as a subprocess with a ``--interval`` second interval,
and injects random faults (every error status, slow answers, resets, truncated/HTML/object
/empty bodies) into ``--fault-rate`` of the instance-ticks. Every ``--sample-every`` seconds
it samples the daemon's RSS, threads and open file descriptors (``/proc/<pid>/status`` and
``/proc/<pid>/fd``) and, on PostgreSQL, its connections (``pg_stat_activity``).

At the end (SIGTERM, clean exit expected) it checks:

* resources are flat: the last 20 % of the run against the window after warm-up (RSS within
  ``--max-rss-growth-mb``, threads within ``--max-thread-growth``, fds within
  ``--max-fd-growth``, connections never above the pool's limit and not growing);
* every tick is accounted for: one ``sync_runs`` row per sync the daemon logged (ok, anomaly
  and failed, by status), and every request the simulator received is an attempt recorded in
  some ``sync_runs`` row (sum of ``attempts`` = requests);
* the SCD2 invariants (one open row per chat, no overlap) and no crash in the log.

Prints one JSON summary line (and ``--csv`` writes the samples); exits 1 if a check failed.

    python benchmarks/soak.py --duration 600 --instances 50 --interval 1 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres --create-database
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from etl.config import FileConfig  # noqa: E402
from etl.db import make_engine, normalise_url, upgrade  # noqa: E402
from etl.simulator import ChangeRates, Fault, Simulator  # noqa: E402

FAULTS: list[tuple[str, Fault]] = [
    ("400-starting", Fault(status=400, body=b"instance in starting process try later")),
    ("400-not-authorized", Fault(status=400, body=b"instance account not authorized")),
    ("400-expired", Fault(status=400, body=b"Instance account is expired")),
    ("400-bad-request", Fault(status=400)),
    ("401", Fault(status=401)),
    ("403", Fault(status=403)),
    ("404", Fault(status=404)),
    ("429", Fault(status=429)),
    ("429-retry-after", Fault(status=429, retry_after="0")),
    ("466", Fault(status=466)),
    ("499", Fault(status=499)),
    ("500", Fault(status=500)),
    ("502", Fault(status=502, mode="html")),
    ("503", Fault(status=503)),
    ("504", Fault(status=504)),
    ("slow-timeout", Fault(delay=2.0)),
    ("slow-ok", Fault(delay=0.2)),
    ("reset", Fault(mode="reset")),
    ("truncate", Fault(mode="truncate")),
    ("html", Fault(mode="html")),
    ("object", Fault(mode="object")),
    ("empty", Fault(mode="empty")),
]

LOG_OK = re.compile(r"etl\.sync: instance (\d+): (ok|anomaly)\b")
LOG_FAILED = re.compile(r"etl\.sync: instance (\d+): sync failed kind=(\w+)")
LOG_DEFERRED = re.compile(r"instance (\d+): sync failed \((\w+)\) and could not be recorded yet")
LOG_WRITTEN_LATER = re.compile(r"wrote (\d+) failed ticks kept while the database")
LOG_DROPPED = re.compile(r"\((\d+) older ones were dropped")


@dataclass
class Sample:
    t: float
    rss_kb: int
    threads: int
    fds: int
    connections: int | None
    cpu_seconds: float
    sync_runs: int | None  # None while the database is down
    requests: int


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_config(path: Path, sim: Simulator, interval: int, workers: int) -> None:
    body = sim.config_toml(interval_seconds=interval)
    head = f"[scheduler]\nmax_workers = {workers}\nshutdown_timeout_seconds = 30\n\n"
    if "http" in FileConfig.model_fields:  # the status endpoint is not what we measure
        head += "[http]\nenabled = false\n\n"
    path.write_text(head + body, encoding="utf-8")
    path.chmod(0o600)


def create_database(url: str) -> tuple[str, Any]:
    admin = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    name = f"etl_soak_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    new = make_url(normalise_url(url)).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return new, drop


class Injector(threading.Thread):
    """Each interval, give each instance a one-shot random fault with ``rate`` probability."""

    def __init__(self, sim: Simulator, rate: float, interval: float, seed: int) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.sim, self.rate, self.interval = sim, rate, interval
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.injected: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            for iid in self.sim.instance_ids:
                if self.rnd.random() < self.rate:
                    name, fault = self.rnd.choice(FAULTS)
                    self.sim.set_fault(iid, Fault(**{**asdict(fault), "times": 1}))
                    self.injected[name] += 1


class Outages(threading.Thread):
    """Stops the private PostgreSQL server ``count`` times, evenly spread over the run, for
    ``seconds`` each (``pg_ctl stop -m fast``: every connection closed), then starts it."""

    def __init__(self, server: Any, count: int, seconds: float, duration: float) -> None:
        super().__init__(name="pg-outages", daemon=True)
        self.server, self.count, self.seconds, self.duration = server, count, seconds, duration
        self.stop = threading.Event()
        self.done: list[tuple[float, float]] = []  # (down at, up at), time.time()

    def run(self) -> None:
        t0 = time.monotonic()
        for k in range(self.count):
            at = self.duration * (k + 1) / (self.count + 1)
            if self.stop.wait(max(0.0, at - (time.monotonic() - t0))):
                return
            down = time.time()
            self.server.stop()
            self.stop.wait(self.seconds)
            self.server.start()
            self.done.append((down, time.time()))


def window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.t <= end]


def check_invariants(engine: Engine) -> list[str]:
    problems = []
    with engine.connect() as conn:
        two_open = conn.execute(
            text(
                "SELECT COUNT(*) FROM (SELECT instance_id, chat_id FROM chat_ephemeral_history "
                "WHERE valid_to IS NULL GROUP BY instance_id, chat_id HAVING COUNT(*) > 1) x"
            )
        ).scalar_one()
        no_open = conn.execute(
            text(
                "SELECT COUNT(*) FROM chats c WHERE NOT EXISTS (SELECT 1 FROM "
                "chat_ephemeral_history h WHERE h.instance_id = c.instance_id AND "
                "h.chat_id = c.chat_id AND h.valid_to IS NULL)"
            )
        ).scalar_one()
        overlap = conn.execute(
            text(
                "SELECT COUNT(*) FROM chat_ephemeral_history a JOIN chat_ephemeral_history b "
                "ON a.instance_id = b.instance_id AND a.chat_id = b.chat_id AND a.id <> b.id "
                "AND a.valid_from < COALESCE(b.valid_to, '9999-12-31') "
                "AND b.valid_from < COALESCE(a.valid_to, '9999-12-31')"
            )
        ).scalar_one()
        mismatch = conn.execute(
            text(
                "SELECT COUNT(*) FROM chats c JOIN chat_ephemeral_history h ON "
                "h.instance_id = c.instance_id AND h.chat_id = c.chat_id AND h.valid_to IS NULL "
                "WHERE h.ephemeral_expiration <> c.ephemeral_expiration"
            )
        ).scalar_one()
    for label, n in (
        ("chats with two open history rows", two_open),
        ("chats without an open history row", no_open),
        ("overlapping history periods", overlap),
        ("open rows that differ from the chat", mismatch),
    ):
        if n:
            problems.append(f"{n} {label}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--instances", type=int, default=50)
    p.add_argument("--chats", type=int, default=30, help="chats per instance")
    p.add_argument("--interval", type=int, default=1, help="daemon interval, seconds")
    p.add_argument("--workers", type=int, default=8, help="daemon max_workers")
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    p.add_argument(
        "--create-database",
        action="store_true",
        help="PostgreSQL: create a fresh database on that server, drop it afterwards",
    )
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of faulty ticks")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument(
        "--new-chat-rate",
        type=float,
        default=0.01,
        help="share of chats added per simulator step (0: a fixed population)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--csv", type=Path, default=None, help="write the samples here")
    p.add_argument("--log", type=Path, default=None, help="keep the daemon's log here")
    p.add_argument("--max-rss-growth-mb", type=float, default=30.0)
    p.add_argument("--max-thread-growth", type=int, default=4)
    p.add_argument("--max-fd-growth", type=int, default=8)
    p.add_argument(
        "--pg-outages",
        type=int,
        default=0,
        help="run PostgreSQL privately (initdb on a free port) and stop it this many times",
    )
    p.add_argument("--pg-outage-seconds", type=float, default=10.0)
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="etl-soak-"))
    url = args.database_url or f"sqlite:///{tmp / 'soak.db'}"
    drop = None
    server = None
    if args.pg_outages:
        from tests.pgserver import PrivatePostgres, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"--pg-outages needs a private PostgreSQL server: {reason}")
        server = PrivatePostgres()
        server.start()
        url = server.url
    elif args.create_database:
        url, drop = create_database(url)
    # reads only, and never the project's BEGIN IMMEDIATE on SQLite (that would take the
    # write lock from the daemon at every sample)
    engine = create_engine(normalise_url(url), pool_pre_ping=True)
    outages = None
    pg = engine.dialect.name == "postgresql"
    log_path = args.log or tmp / "daemon.log"
    problems: list[str] = []
    samples: list[Sample] = []
    rates = ChangeRates(
        new=args.new_chat_rate,
        rename=0.02,
        archive=0.02,
        ephemeral=0.03,
        removal=0.005 if args.new_chat_rate else 0.0,
    )
    try:
        migrate = make_engine(url)
        upgrade(migrate)
        migrate.dispose()
        with Simulator(
            instances=args.instances,
            chats=args.chats,
            seed=args.seed,
            rates=rates,
            tick_seconds=max(1.0, args.interval * 2.0),
        ) as sim:
            config = tmp / "etl.toml"
            write_config(config, sim, args.interval, args.workers)
            env = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
            with log_path.open("wb") as log_file:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "etl", "--config", str(config)]
                    + ["--database-url", url, "run"],
                    cwd=tmp,
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
                injector = Injector(sim, args.fault_rate, args.interval, args.seed)
                injector.start()
                if server is not None:
                    outages = Outages(
                        server, args.pg_outages, args.pg_outage_seconds, args.duration
                    )
                    outages.start()
                t0 = time.monotonic()
                try:
                    while (now := time.monotonic() - t0) < args.duration:
                        if daemon.poll() is not None:
                            problems.append(f"daemon exited early ({daemon.returncode})")
                            break
                        samples.append(sample(daemon.pid, engine, pg, sim, now))
                        time.sleep(min(args.sample_every, max(0.0, args.duration - now + 0.01)))
                    if daemon.poll() is None:
                        samples.append(sample(daemon.pid, engine, pg, sim, args.duration))
                finally:
                    injector.stop.set()
                    injector.join()
                    if outages is not None:
                        outages.stop.set()
                        outages.join()
                        if server is not None and not (server.data / "postmaster.pid").exists():
                            server.start()
                    for iid in sim.instance_ids:
                        sim.set_fault(iid, None)
                    if daemon.poll() is None:
                        daemon.send_signal(signal.SIGTERM)
                    try:
                        rc = daemon.wait(60)
                    except subprocess.TimeoutExpired:
                        daemon.kill()
                        rc = daemon.wait()
                        problems.append("daemon did not exit within 60 s of SIGTERM")
            if rc != 0:
                problems.append(f"daemon exit status {rc}")
            summary = summarise(args, engine, sim, samples, injector, log_path, problems)
            if outages is not None:
                summary["pg_outages"] = outage_report(engine, sim, outages, args, problems)
    finally:
        engine.dispose()
        if drop is not None:
            drop()
        if server is not None:
            server.close()
    if args.csv:
        with args.csv.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(samples[0])) if samples else [])
            writer.writeheader()
            writer.writerows(asdict(s) for s in samples)
    summary["ok"] = not problems
    summary["problems"] = problems
    print(json.dumps(summary, sort_keys=True))
    return 0 if not problems else 1


def sample(pid: int, engine: Engine, pg: bool, sim: Simulator, t: float) -> Sample:
    status = proc_status(pid)
    connections = runs = None
    try:
        with engine.connect() as conn:
            if pg:
                connections = int(
                    conn.execute(
                        text(
                            "SELECT COUNT(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).scalar_one()
                )
            runs = int(conn.execute(text("SELECT COUNT(*) FROM sync_runs")).scalar_one())
    except SQLAlchemyError:  # the database is down (--pg-outages): no database figures
        pass
    return Sample(
        t=round(t, 1),
        rss_kb=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        connections=connections,
        cpu_seconds=round(cpu_seconds(pid), 2),
        sync_runs=runs,
        requests=sim.request_count(),
    )


def summarise(
    args: argparse.Namespace,
    engine: Engine,
    sim: Simulator,
    samples: list[Sample],
    injector: Injector,
    log_path: Path,
    problems: list[str],
) -> dict[str, Any]:
    log = log_path.read_text(encoding="utf-8", errors="replace")
    logged_ok = Counter(m.group(2) for m in LOG_OK.finditer(log))
    logged_failed = Counter(m.group(2) for m in LOG_FAILED.finditer(log))
    deferred = Counter(m.group(2) for m in LOG_DEFERRED.finditer(log))
    written_later = sum(int(m.group(1)) for m in LOG_WRITTEN_LATER.finditer(log))
    dropped = sum(int(m.group(1)) for m in LOG_DROPPED.finditer(log))
    skipped_busy = log.count("maximum number of running instances reached")
    missed = log.count("was missed by")
    with engine.connect() as conn:
        by_status = dict(
            conn.execute(text("SELECT status, COUNT(*) FROM sync_runs GROUP BY status")).all()
        )
        by_kind = dict(
            conn.execute(
                text(
                    "SELECT error_kind, COUNT(*) FROM sync_runs WHERE status = 'failed' "
                    "GROUP BY error_kind ORDER BY error_kind"
                )
            ).all()
        )
        attempts = int(
            conn.execute(text("SELECT COALESCE(SUM(attempts), 0) FROM sync_runs")).scalar_one()
        )
        per_instance = [
            int(n)
            for (n,) in conn.execute(
                text("SELECT COUNT(*) FROM sync_runs GROUP BY instance_id")
            ).all()
        ]
        chats = int(conn.execute(text("SELECT COUNT(*) FROM chats")).scalar_one())
        history = int(
            conn.execute(text("SELECT COUNT(*) FROM chat_ephemeral_history")).scalar_one()
        )
    requests = sim.request_count()
    runs = sum(by_status.values())
    logged = {
        "ok": logged_ok.get("ok", 0),
        "anomaly": logged_ok.get("anomaly", 0),
        # written at once, plus those kept while the database was down and written later
        "failed": sum(logged_failed.values()) + sum(deferred.values()),
    }
    recorded = {k: int(by_status.get(k, 0)) for k in ("ok", "anomaly", "failed")}
    if logged != recorded:
        problems.append(f"ticks logged {logged} != sync_runs rows {recorded}")
    if sum(deferred.values()) != written_later + dropped:
        problems.append(
            f"{sum(deferred.values())} ticks kept while the database was down, "
            f"{written_later} written later, {dropped} dropped"
        )
    if dropped:
        problems.append(f"{dropped} failed ticks dropped (over the in-memory limit)")
    if requests != attempts:
        problems.append(f"simulator received {requests} requests, sync_runs record {attempts}")
    if "Traceback" in log:
        problems.append("a traceback in the daemon log")
    problems.extend(check_invariants(engine))

    resources: dict[str, Any] = {}
    if len(samples) >= 4:
        d = args.duration
        base = window(samples, 0.1 * d, 0.3 * d) or samples[1:2]
        end = window(samples, 0.8 * d, d) or samples[-1:]

        def stat(key: str) -> dict[str, Any]:
            values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
            b = [getattr(s, key) for s in base if getattr(s, key) is not None]
            e = [getattr(s, key) for s in end if getattr(s, key) is not None]
            if not values:
                return {}
            return {
                "first": values[0],
                "baseline_median": statistics.median(b) if b else None,
                "baseline_max": max(b) if b else None,
                "end_median": statistics.median(e) if e else None,
                "end_max": max(e) if e else None,
                "last": values[-1],
                "max": max(values),
            }

        for key in ("rss_kb", "threads", "fds", "connections"):
            resources[key] = stat(key)
        rss = resources["rss_kb"]
        growth_mb = (rss["end_median"] - rss["baseline_median"]) / 1024
        resources["rss_kb"]["growth_mb"] = round(growth_mb, 1)
        if growth_mb > args.max_rss_growth_mb:
            problems.append(f"RSS grew {growth_mb:.1f} MB after warm-up")
        th = resources["threads"]
        if th["end_max"] > th["baseline_max"] + args.max_thread_growth:
            problems.append(f"threads grew: {th['baseline_max']} -> {th['end_max']}")
        fd = resources["fds"]
        if fd["end_max"] > fd["baseline_max"] + args.max_fd_growth:
            problems.append(f"fds grew: {fd['baseline_max']} -> {fd['end_max']}")
        cn = resources["connections"]
        if cn:
            limit = 2 * args.workers + 2  # pool_size + max_overflow (+ lease/heartbeat slack)
            if cn["max"] > limit:
                problems.append(f"{cn['max']} database connections (limit {limit})")
            if cn["end_max"] > cn["baseline_max"] + 2:
                problems.append(f"connections grew: {cn['baseline_max']} -> {cn['end_max']}")
        cpu = samples[-1].cpu_seconds
        resources["cpu_seconds"] = cpu
    else:
        problems.append(f"only {len(samples)} samples")

    return {
        "duration_s": args.duration,
        "instances": args.instances,
        "chats_per_instance": args.chats,
        "interval_s": args.interval,
        "fault_rate": args.fault_rate,
        "database": engine.dialect.name,
        "expected_ticks": int(args.instances * args.duration / args.interval),
        "sync_runs": runs,
        "sync_runs_by_status": recorded,
        "failed_by_kind": by_kind,
        "ticks_logged": logged,
        "ticks_kept_while_database_down": dict(deferred),
        "ticks_written_after_database_returned": written_later,
        "ticks_per_instance_min": min(per_instance) if per_instance else 0,
        "ticks_per_instance_max": max(per_instance) if per_instance else 0,
        "scheduler_skipped_busy": skipped_busy,
        "scheduler_missed": missed,
        "requests": requests,
        "attempts_recorded": attempts,
        "faults_injected": dict(sorted(injector.injected.items())),
        "faults_injected_total": sum(injector.injected.values()),
        "chats": chats,
        "history_rows": history,
        "samples": len(samples),
        "resources": resources,
    }


def outage_report(
    engine: Engine,
    sim: Simulator,
    outages: Outages,
    args: argparse.Namespace,
    problems: list[str],
) -> list[dict[str, Any]]:
    """Per outage: failed ticks recorded for it, and how long after the server came back
    each instance synced again (the API called and the outcome written; within about one
    interval)."""
    report = []
    with engine.connect() as conn:
        for down, up in outages.done:
            lost = conn.execute(
                text(
                    "SELECT error_kind, COUNT(*) FROM sync_runs WHERE status = 'failed' "
                    "AND started_at >= :a AND started_at < :b GROUP BY error_kind"
                ),
                {"a": _ts(down), "b": _ts(up)},
            ).all()
            first_ok = conn.execute(
                text(
                    "SELECT instance_id, MIN(started_at) FROM sync_runs "
                    "WHERE started_at >= :b AND error_kind IS DISTINCT FROM 'database' "
                    "GROUP BY instance_id"
                ),
                {"b": _ts(up)},
            ).all()
            resume = [r[1].timestamp() - up for r in first_ok]
            entry = {
                "down_s": round(up - down, 1),
                "failed_recorded_during": {k: int(n) for k, n in lost},
                "instances_resumed": len(first_ok),
                "resume_after_start_s_median": round(statistics.median(resume), 2)
                if resume
                else None,
                "resume_after_start_s_max": round(max(resume), 2) if resume else None,
            }
            report.append(entry)
            # (an instance backing off after an injected 401 may come back later, by design)
            if len(first_ok) < len(sim.instance_ids):
                problems.append(f"outage at {down:.0f}: not every instance synced again")
            elif statistics.median(resume) > args.interval + 1.0:
                problems.append(f"outage at {down:.0f}: resumed only after {max(resume):.1f} s")
    if len(outages.done) < args.pg_outages:
        problems.append(f"only {len(outages.done)} of {args.pg_outages} outages happened")
    return report


def _ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


if __name__ == "__main__":
    sys.exit(main())

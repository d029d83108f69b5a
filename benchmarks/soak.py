#!/usr/bin/env python3
"""Soak test: the real daemon against a faulty simulator for a long time; resources stay flat.

Starts the Green-API simulator in this process (``--instances`` instances whose lists keep
changing), runs ``python -m etl run`` as a subprocess with a ``--interval`` second interval,
and injects random faults (every error status, slow answers, resets, truncated/HTML/object
/empty bodies) into ``--fault-rate`` of the instance-ticks. Every ``--sample-every`` seconds
it samples the daemon's RSS, threads and open file descriptors (``/proc/<pid>/status`` and
``/proc/<pid>/fd``) and, on PostgreSQL, its connections (``pg_stat_activity``).

At the end (SIGTERM, clean exit expected) it checks:

* nothing leaks (``judge_resources``), by bounds that come from the daemon's configuration
  and that load cannot cross: warm-up on a busy machine only fills the daemon's pools,
  which the bounds allow for, while a leak grows without end. Never above them, in two
  samples in a row: the daemon's PostgreSQL connections (its engine's pool capacity), its
  threads (the fixed ones and what its executors may start) and its sockets and database
  files (what its database and HTTP pools hold). Over the second half of the run (after
  warm-up): RSS within ``--max-rss-growth-mb`` and the other descriptors flat (within
  ``--max-file-fd-growth``). A short run tells only a fast leak from warm-up; the longer
  the run, the slower the leak it finds;
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402
from sqlalchemy.pool import QueuePool  # noqa: E402

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
    connection_fds: int  # of ``fds``: sockets, and the SQLite database's files
    connections: int | None  # the daemon's, in pg_stat_activity; None on SQLite or while down
    cpu_seconds: float
    sync_runs: int | None  # None while the database is down
    requests: int


#: ``application_name`` of the daemon's PostgreSQL connections (in its URL): the soak counts
#: exactly these, not its own sampling connection, autovacuum workers or anyone else's
DAEMON_APPLICATION_NAME = "chatsync-soak-daemon"

#: The daemon's threads apart from its executors' workers: the main thread and APScheduler's
#: loop (etl/scheduler.py; the status server's thread is not started, ``[http]`` is off)
FIXED_THREADS = 2
#: Threads started with their first job besides the sync workers: one for each of the
#: liveness, replica-heartbeat and maintenance executors (etl/scheduler.py) and the HTTP
#: client's body watchdog (etl/client.py)
LAZY_THREADS = 4
#: Descriptors per pooled database connection: a socket on PostgreSQL; on SQLite the
#: database file and its WAL file, and the shared-memory index (one per process, counted per
#: connection to keep one bound)
FDS_PER_CONNECTION = {"postgresql": 1, "sqlite": 3}
#: A count above its bound must be seen in this many samples in a row to be a leak: a leaked
#: connection stays open, while PostgreSQL lists a backend whose client has just closed it
#: until that process has exited, and that is not a whole sample interval
SUSTAINED = 2


@dataclass(frozen=True)
class Bounds:
    """The most the daemon holds without a leak, from its configuration."""

    workers: int  # ``[scheduler] max_workers``
    pool_capacity: int  # its engine's pool_size + max_overflow (``pool_capacity``)
    fds_per_connection: int
    rss_growth_mb: float
    file_fd_growth: int

    @property
    def threads(self) -> int:
        # thread pools start a thread when a job arrives while every thread is busy, up to
        # their max_workers, and never stop one: a busy machine, where more syncs overlap,
        # may fill them at any time, but never past their size
        return FIXED_THREADS + self.workers + LAZY_THREADS

    @property
    def connection_fds(self) -> int:
        # every socket is a database connection (the pool opens no more than its capacity)
        # or an HTTP connection to the simulator: the client's pool keeps max_workers
        # (etl/cli.py) and only the sync workers send requests, one at a time each
        return self.pool_capacity * self.fds_per_connection + self.workers


def pool_capacity(engine: Engine) -> int:
    """pool_size + max_overflow: the most connections the engine opens at once."""
    pool = engine.pool
    # QueuePool has no public accessor for max_overflow (-1: no limit)
    overflow = getattr(pool, "_max_overflow", -1)
    if not isinstance(pool, QueuePool) or overflow < 0:
        raise SystemExit(f"cannot bound the daemon's connections: {pool.status()}")
    return pool.size() + overflow


def _sustained_over(samples: Sequence[Sample], key: str, bound: int) -> Sample | None:
    """The first sample of ``SUSTAINED`` in a row whose ``key`` is above ``bound``."""
    run: list[Sample] = []
    for s in samples:
        value = getattr(s, key)
        if value is None:  # the database was down: no figure, no break in the run
            continue
        run = run + [s] if value > bound else []
        if len(run) >= SUSTAINED:
            return run[0]
    return None


def judge_resources(
    samples: Sequence[Sample], duration: float, bounds: Bounds
) -> tuple[dict[str, Any], list[str]]:
    """The resource figures, and a problem for each leak: from the samples alone (no I/O),
    so that tests can feed it synthetic ones."""
    problems: list[str] = []
    resources: dict[str, Any] = {}
    if not samples:
        return resources, ["no samples"]

    for key, bound, what in (
        ("connections", bounds.pool_capacity, "database connections, above the pool's {}"),
        ("threads", bounds.threads, "threads, above the {} the daemon's executors allow"),
        ("connection_fds", bounds.connection_fds, "sockets and database files, above {}"),
    ):
        values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        if not values:
            continue
        resources[key] = {"first": values[0], "max": max(values), "last": values[-1]}
        resources[key]["bound"] = bound
        over = _sustained_over(samples, key, bound)
        if over is not None:
            problems.append(
                f"{getattr(over, key)} {what.format(bound)} from {over.t:g} s on "
                f"({SUSTAINED}+ samples in a row)"
            )
    if resources.get("connections", {}).get("max") == 0:
        problems.append(
            f"no connection named {DAEMON_APPLICATION_NAME} in pg_stat_activity: the "
            "connection bound measured nothing"
        )

    # after warm-up; a busy machine may take a large share of a short run to start
    after = [s for s in samples if s.t >= duration / 2]
    if len(after) < 2:
        problems.append(f"{len(after)} samples in the second half of the run: too few")
        return resources, problems
    k = max(1, len(after) // 4)
    first, last = after[:k], after[-k:]

    # RSS: medians of the first and last quarter of the second half. After warm-up the
    # daemon's memory follows its data (one fingerprint per chat seen: the population grows
    # with --new-chat-rate) and caches of a fixed size; the bound is the largest growth
    # that data and the allocator explain, a leak passes it in a long enough run
    start = statistics.median(s.rss_kb for s in first)
    end = statistics.median(s.rss_kb for s in last)
    growth_mb = round((end - start) / 1024, 1)
    resources["rss_kb"] = {
        "first": samples[0].rss_kb,
        "max": max(s.rss_kb for s in samples),
        "last": samples[-1].rss_kb,
        "second_half_start_median": start,
        "second_half_end_median": end,
        "second_half_growth_mb": growth_mb,
        "bound_mb": bounds.rss_growth_mb,
    }
    if growth_mb > bounds.rss_growth_mb:
        problems.append(
            f"RSS grew {growth_mb:.1f} MB over the second half of the run "
            f"(bound {bounds.rss_growth_mb:g} MB)"
        )

    # the other descriptors (the log, stdio, files): the daemon opens them at start and
    # none per tick. Their floor (the minimum of a window) rises with a leak, not with a
    # descriptor held for a moment; the bound admits a library that opens one on first use
    def files(s: Sample) -> int:
        return s.fds - s.connection_fds

    start_floor = min(files(s) for s in first)
    end_floor = min(files(s) for s in last)
    resources["file_fds"] = {
        "first": files(samples[0]),
        "max": max(files(s) for s in samples),
        "last": files(samples[-1]),
        "second_half_start_min": start_floor,
        "second_half_end_min": end_floor,
        "bound_growth": bounds.file_fd_growth,
    }
    if end_floor - start_floor > bounds.file_fd_growth:
        problems.append(
            f"file descriptors other than sockets grew {start_floor} -> {end_floor} over "
            f"the second half of the run (bound +{bounds.file_fd_growth})"
        )
    resources["fds"] = {
        "first": samples[0].fds,
        "max": max(s.fds for s in samples),
        "last": samples[-1].fds,
    }
    resources["cpu_seconds"] = samples[-1].cpu_seconds
    return resources, problems


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
    p.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=30.0,
        help="over the second half of the run (default 30)",
    )
    p.add_argument(
        "--max-file-fd-growth",
        type=int,
        default=2,
        help="descriptors other than sockets and database files, over the second half",
    )
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
    daemon_url = url
    if pg:
        daemon_url = (
            make_url(url)
            .update_query_dict({"application_name": DAEMON_APPLICATION_NAME})
            .render_as_string(hide_password=False)
        )
    db_file = None if pg else os.path.realpath(make_url(url).database or "")
    try:
        # made as the daemon makes its engine (etl/cli.py: pool_size = max_workers)
        migrate = make_engine(url, pool_size=args.workers)
        bounds = Bounds(
            workers=args.workers,
            pool_capacity=pool_capacity(migrate),
            fds_per_connection=FDS_PER_CONNECTION[engine.dialect.name],
            rss_growth_mb=args.max_rss_growth_mb,
            file_fd_growth=args.max_file_fd_growth,
        )
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
                    + ["--database-url", daemon_url, "run"],
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
                t0, t0_wall = time.monotonic(), time.time()
                try:
                    while (now := time.monotonic() - t0) < args.duration:
                        if daemon.poll() is not None:
                            problems.append(f"daemon exited early ({daemon.returncode})")
                            break
                        samples.append(sample(daemon.pid, engine, db_file, sim, now))
                        time.sleep(min(args.sample_every, max(0.0, args.duration - now + 0.01)))
                    if daemon.poll() is None:
                        samples.append(sample(daemon.pid, engine, db_file, sim, args.duration))
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
            summary = summarise(
                args, engine, sim, samples, injector, log_path, problems, bounds, t0_wall
            )
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


def sample(pid: int, engine: Engine, db_file: str | None, sim: Simulator, t: float) -> Sample:
    """``db_file``: the SQLite database (its descriptors are connections); None on
    PostgreSQL."""
    status = proc_status(pid)
    connections = runs = None
    try:
        with engine.connect() as conn:
            if db_file is None:
                connections = int(
                    conn.execute(
                        text(
                            "SELECT COUNT(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND application_name = :name"
                        ),
                        {"name": DAEMON_APPLICATION_NAME},
                    ).scalar_one()
                )
            runs = int(conn.execute(text("SELECT COUNT(*) FROM sync_runs")).scalar_one())
    except SQLAlchemyError:  # the database is down (--pg-outages): no database figures
        pass
    fds = connection_fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        fds += 1
        if target.startswith("socket:") or (db_file and target.startswith(db_file)):
            connection_fds += 1
    return Sample(
        t=round(t, 1),
        rss_kb=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        fds=fds,
        connection_fds=connection_fds,
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
    bounds: Bounds,
    t0_wall: float,
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
        # runs started in the last quarter of the run, per instance: each instance still
        # synced near the end (on a loaded machine too: a tick skipped or dropped as late
        # does not hold back the instance's next one)
        late = dict(
            conn.execute(
                text(
                    "SELECT instance_id, COUNT(*) FROM sync_runs WHERE started_at >= :t "
                    "GROUP BY instance_id"
                ),
                {"t": _ts(t0_wall + 0.75 * args.duration)},
            ).all()
        )
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

    resources, leaks = judge_resources(samples, args.duration, bounds)
    problems.extend(leaks)

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
        "ticks_per_instance_last_quarter_min": min(
            (int(late.get(iid, 0)) for iid in sim.instance_ids), default=0
        ),
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

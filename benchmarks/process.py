"""Whole-process benchmark: a fresh ``etl sync --once`` process against a fresh floor
process, side by side, for N instances x M chats.

    python benchmarks/process.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --instances 1000 --chats 500 --runs 5 --ticks 3 --nochange-ticks 2

``fleet.py`` measures ticks inside one long-lived process (a warm daemon); this measures
what a cron job or an operator pays: every pass is a new Python process, timed from its
spawn to its exit. The simulator runs in a process of its own (``fleet.SimProcess``); a
config file lists its instances (inline tokens, loopback only). Each pass runs, on the same
frozen simulator state:

- the *floor*: ``benchmarks/floor_process.py``, a process that reads the same config and
  fetches and decodes every list (``requests``, ``--workers`` threads, ``orjson.loads``)
  with no database and no chatsync code;
- the *sync*: ``python -m etl --config ... --database-url ... sync --once --workers W``.

A run is one **cold** pass (first load into an empty, freshly migrated database: a copy of
a migrated template), ``--ticks`` **steady** passes (the simulator stepped before each,
about ``--change-rate`` of the chats changed) and ``--nochange-ticks`` **no-change**
passes (the same lists again); ``--runs`` runs, each into a database of its own. The two
processes of a pass alternate which goes first, phase by phase. Per phase the summary
gives medians of the wall and CPU times and the median of the per-pass ``sync / floor``
wall ratios.

``--first-request`` measures start-up instead: with ``--instances`` configured (default
10,000; tiny lists), the time from spawning a process until the simulator receives its
first getChats request, for the floor process, for ``etl sync --once`` into an empty
migrated database (``new``: it registers every instance first) and into a database that a
complete ``etl sync --once`` filled before (``registered``). Each process is killed once
its first request arrived. Give ``--etl-path`` more than once to compare the sync of
several trees (a checkout of another commit) side by side, interleaved.

Output: one JSON line per process (``"type": "process"`` or ``"first_request"``), then a
``"type": "summary"`` line. Fields of a process line:

- ``wall_s``: spawn to exit; ``cpu_s`` = ``user_s`` + ``sys_s`` and ``peak_rss_mb``: the
  child's own (``os.wait4``); ``exit_code``.
- ``sim_cpu_s``: CPU seconds of the simulator process meanwhile; ``db_cpu_s`` (sync, on
  PostgreSQL): CPU seconds of the database's client backends, read from ``/proc`` every
  ``--db-sample-seconds`` while the process runs (the last slice before a backend exits is
  missed); ``http_requests``: getChats requests the simulator answered; ``loadavg_1m``:
  the machine's load average when the process ended.
- sync: ``statuses`` and ``changes`` (summed from the outcome table the command prints);
  floor: ``chats_decoded`` (elements decoded).

``--py-spy FILE`` runs the sync processes of the ``--py-spy-phase`` passes under py-spy
(where the CPU of a fresh process goes; those passes' timings include py-spy's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fleet import (  # noqa: E402
    _LINE_NO,
    ROOT,
    SimProcess,
    emit,
    hotspots,
    proc_cpu_seconds,
    scratch_database,
)
from sqlalchemy import Engine, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from etl.db import make_engine, normalise_url, upgrade  # noqa: E402

FLOOR = HERE / "floor_process.py"
#: the columns of ``etl sync --once``'s outcome table that are counts, in order
OUTCOME_COLUMNS = (
    "chats_received",
    "chats_inserted",
    "chats_updated",
    "chats_removed",
    "chats_rejected",
    "ephemeral_changes",
)
FIRST_REQUEST_GOAL_S = 2.0


# --- the processes -----------------------------------------------------------------------


@dataclass
class Finished:
    """A child process that has exited, and what it used."""

    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    exit_code: int
    #: when the simulator received its first getChats request, seconds after the spawn
    first_request_s: float | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.user_s + self.sys_s, 4),
            "user_s": round(self.user_s, 4),
            "sys_s": round(self.sys_s, 4),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "exit_code": self.exit_code,
        }


def child_env(etl_path: Path) -> dict[str, str]:
    """The environment of a child: chatsync imported from ``etl_path``, nothing taken from
    the caller's ETL_* variables (the flags say everything)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(etl_path), env.get("PYTHONPATH")]))
    return env


#: The launcher: a small Python process that starts each measured process and reaps it.
#: A child's peak RSS (``ru_maxrss``) counts the memory of the process it was forked from,
#: up to its exec: started from this benchmark process (the simulator's client, SQLAlchemy,
#: ...) every child would report at least this process's size. Forked from the launcher,
#: which imports next to nothing, a child's figure is its own. Protocol, one JSON line
#: each way: a command in; the pid and the start time out; then its exit and usage out.
LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(job["cmd"], env=job["env"], cwd=job["cwd"], stdout=out, stderr=err)
    print(json.dumps({"pid": proc.pid, "t0": t0}), flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"t1": t1, "exit_code": proc.returncode, "user_s": usage.ru_utime,
                      "sys_s": usage.ru_stime, "maxrss_kib": usage.ru_maxrss}), flush=True)
"""


class Launcher:
    """Starts the measured processes through ``LAUNCHER``, one at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid: int | None = None
        self.t0 = 0.0

    def _send(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if job:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def start(
        self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path, out: Path, err: Path
    ) -> tuple[int, float]:
        """Spawn ``cmd``; its pid and when it was spawned (``time.monotonic()``)."""
        job = {"cmd": list(cmd), "env": env, "cwd": str(cwd), "out": str(out), "err": str(err)}
        started = self._send(job)
        self.pid, self.t0 = int(started["pid"]), float(started["t0"])
        return self.pid, self.t0

    def finish(self) -> Finished:
        """Wait for the process started last to exit: its wall time, CPU and peak RSS."""
        done = self._send({})
        self.pid = None
        return Finished(
            wall_s=done["t1"] - self.t0,
            user_s=done["user_s"],
            sys_s=done["sys_s"],
            peak_rss_mb=done["maxrss_kib"] / 1024,  # KiB on Linux
            exit_code=done["exit_code"],
        )

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        if self.pid is not None:
            self.finish()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


class BackendCpu:
    """CPU seconds of the PostgreSQL client backends of one database while a child runs,
    from ``/proc`` every ``interval`` seconds (a backend's last slice before it exits is
    lost; autovacuum workers are not counted)."""

    def __init__(self, url: str | None, interval: float) -> None:
        self.engine: Engine | None = None
        if url and make_url(normalise_url(url)).get_backend_name() == "postgresql":
            self.engine = create_engine(normalise_url(url))
        self.interval = interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, conn: Any) -> None:
        rows = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
        for (pid,) in rows:
            cpu = proc_cpu_seconds(int(pid))
            if cpu:
                self.seen[int(pid)] = max(cpu, self.seen.get(int(pid), 0.0))

    def _loop(self) -> None:
        assert self.engine is not None
        with self.engine.connect() as conn:
            while True:
                self._sample(conn)
                conn.rollback()
                if self._stop.wait(self.interval):
                    self._sample(conn)
                    return

    def __enter__(self) -> BackendCpu:
        if self.engine is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.engine is not None:
            self.engine.dispose()

    @property
    def total(self) -> float | None:
        return round(sum(self.seen.values()), 4) if self.engine is not None else None


def parse_outcomes(table: str) -> tuple[dict[str, int], dict[str, int]]:
    """Statuses and summed counts from ``etl sync --once``'s outcome table (one row per
    instance: id, status, kind, then the counts, attempts and milliseconds)."""
    statuses: Counter[str] = Counter()
    changes: Counter[str] = Counter()
    for line in table.splitlines():
        cols = line.split()
        if len(cols) != 11 or not cols[0].isdigit() or not all(c.isdigit() for c in cols[3:]):
            continue  # the header, or an error line under a row
        statuses[cols[1]] += 1
        for name, value in zip(OUTCOME_COLUMNS, cols[3:9], strict=True):
            changes[name] += int(value)
    return dict(changes), dict(statuses)


# --- databases ---------------------------------------------------------------------------


class Databases:
    """A migrated, empty template database and fresh copies of it: on PostgreSQL
    ``CREATE DATABASE ... TEMPLATE``, on SQLite a copy of the file. Everything is dropped
    when the stack closes (unless ``keep``)."""

    def __init__(self, url: str, stack: contextlib.ExitStack, *, keep: bool) -> None:
        self.keep = keep
        u = make_url(normalise_url(url))
        self.backend = u.get_backend_name()
        if self.backend == "sqlite":
            self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsync-")))
            self.template = str(self.tmp / "template.db")
            self._migrate(f"sqlite:///{self.template}")
            raw = sqlite3.connect(self.template)  # fold the WAL in: one file to copy
            raw.execute("PRAGMA journal_mode = DELETE")
            raw.close()
            return
        self.admin = create_engine(u, isolation_level="AUTOCOMMIT")
        stack.callback(self.admin.dispose)
        template_url = stack.enter_context(scratch_database(url, keep=keep))
        self._migrate(template_url)
        self.template = make_url(template_url).database or ""
        self.server = u

    @staticmethod
    def _migrate(url: str) -> None:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[str]:
        """The URL of a new, migrated, empty database, dropped when the block ends."""
        name = f"bench_{uuid.uuid4().hex[:12]}"
        if self.backend == "sqlite":
            path = self.tmp / f"{name}.db"
            shutil.copyfile(self.template, path)
            try:
                yield f"sqlite:///{path}"
            finally:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(f"{path}{suffix}").unlink()
            return
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        try:
            yield self.server.set(database=name).render_as_string(hide_password=False)
        finally:
            if self.keep:
                print(f"kept database {name}", file=sys.stderr)
            else:
                with self.admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- the config --------------------------------------------------------------------------


def write_config(path: Path, sim: SimProcess, *, workers: int) -> None:
    """A config listing every simulated instance, tokens inline (loopback only), readable
    by its owner alone (chatsync warns otherwise)."""
    lines = [
        "[defaults]",
        f'api_url = "{sim.url}"',
        "interval_seconds = 60",
        "",
        "[scheduler]",
        f"max_workers = {workers}",
    ]
    for number, (iid, token) in enumerate(sorted(sim.tokens.items()), start=1):
        lines += ["", "[[instances]]", f"id_instance = {iid}", f'api_token = "{token}"']
        lines.append(f'label = "bench {number}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


# --- one process -------------------------------------------------------------------------


@dataclass
class Bench:
    """What every process of the run shares: the simulator, the config, the commands."""

    sim: SimProcess
    config: Path
    work: Path
    workers: int
    #: the trees whose etl package the sync runs (more than one: compared side by side)
    etl_paths: list[Path]
    decoder: str
    db_sample_seconds: float
    log_level: str
    launcher: Launcher
    #: ``py-spy record`` wraps the sync processes whose output names it gives (run_phases)
    py_spy: Path | None = None
    records: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def command(self, mode: str, url: str | None, profile: Path | None = None) -> list[str]:
        if profile is not None:  # sampled by py-spy: the thread holding the GIL, i.e. the CPU
            spy = ["py-spy", "record", "--gil", "--rate", "100", "--format", "raw"]
            return [*spy, "--output", str(profile), "--", *self.command(mode, url)]
        if mode == "floor":
            return [sys.executable, str(FLOOR), "--config", str(self.config)] + [
                "--workers",
                str(self.workers),
                "--decoder",
                self.decoder,
            ]
        assert url is not None
        return [sys.executable, "-m", "etl", "--config", str(self.config)] + [
            "--database-url",
            url,
            "--log-level",
            self.log_level,
            "sync",
            "--once",
            "--workers",
            str(self.workers),
            "--no-progress",
        ]

    def start(
        self, mode: str, url: str | None, tree: int = 0, profile: Path | None = None
    ) -> float:
        """Spawn the ``mode`` process (a sync of ``etl_paths[tree]``, under py-spy into
        ``profile`` if given); when it was spawned (``time.monotonic()``)."""
        out, err = self.work / f"{mode}.out", self.work / f"{mode}.err"
        env = child_env(self.etl_paths[tree] if mode == "sync" else ROOT)
        cmd = self.command(mode, url, profile)
        return self.launcher.start(cmd, env=env, cwd=self.work, out=out, err=err)[1]

    def run(self, mode: str, url: str | None, profile: Path | None = None) -> dict[str, Any]:
        """One whole process, from spawn to exit, and what it reported."""
        requests0, sim_cpu0 = self.sim.requests(), proc_cpu_seconds(self.sim.pid)
        with BackendCpu(url if mode == "sync" else None, self.db_sample_seconds) as db:
            self.start(mode, url, profile=profile)
            done = self.launcher.finish()
        line: dict[str, Any] = {"mode": mode, **done.fields()}
        if profile is not None:
            line["py_spy"] = str(profile)
        line["sim_cpu_s"] = round(proc_cpu_seconds(self.sim.pid) - sim_cpu0, 4)
        line["db_cpu_s"] = db.total
        line["http_requests"] = self.sim.requests() - requests0
        line["loadavg_1m"] = round(os.getloadavg()[0], 2)  # how busy the shared machine was
        out = (self.work / f"{mode}.out").read_text(encoding="utf-8", errors="replace")
        if mode == "sync":
            line["changes"], line["statuses"] = parse_outcomes(out)
        else:
            line["chats_decoded"] = _floor_chats(out)
        if done.exit_code != 0:
            tail = (self.work / f"{mode}.err").read_text(errors="replace")[-2000:]
            print(f"{mode} exited {done.exit_code}:\n{tail}", file=sys.stderr)
        return line

    def first_request(self, mode: str, url: str | None, timeout: float, tree: int = 0) -> Finished:
        """Spawn a process, wait for its first getChats request, kill it."""
        self.sim.reset()
        t0 = self.start(mode, url, tree)
        at = None
        while at is None and _alive(self.launcher.pid) and time.monotonic() < t0 + timeout:
            time.sleep(0.02)
            at = self.sim.first_request(t0)
        at = at if at is not None else self.sim.first_request(t0)
        self.launcher.kill()
        done = self.launcher.finish()
        done.first_request_s = None if at is None else at - t0
        return done


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _floor_chats(out: str) -> int | None:
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            return int(json.loads(line)["chats"])
    return None


# --- the runs ----------------------------------------------------------------------------


def pass_plan(ticks: int, nochange: int) -> list[str]:
    return ["cold"] + ["steady"] * ticks + ["nochange"] * nochange


def run_phases(
    args: argparse.Namespace, bench: Bench, dbs: Databases, common: dict[str, Any]
) -> None:
    pairs: Counter[str] = Counter()  # per phase, so that each phase alternates the order
    for run in range(args.runs):
        with dbs.fresh() as url:
            for tick, phase in enumerate(pass_plan(args.ticks, args.nochange_ticks)):
                prepare_s = bench.sim.step(1) if phase == "steady" else 0.0
                order = ["floor", "sync"] if pairs[phase] % 2 == 0 else ["sync", "floor"]
                pairs[phase] += 1
                for position, mode in enumerate(order):
                    line = {"type": "process", "run": run, "tick": tick, "phase": phase}
                    line |= {**common, "first": position == 0}
                    profile = None
                    if mode == "sync" and bench.py_spy and phase == args.py_spy_phase:
                        profile = bench.py_spy.with_name(f"{bench.py_spy.stem}-{run}-{tick}.txt")
                    line |= bench.run(mode, url if mode == "sync" else None, profile)
                    line["sim_prepare_s"] = round(prepare_s, 4)
                    bench.records[mode].append(line)
                    emit(line)


def run_first_request(
    args: argparse.Namespace, bench: Bench, dbs: Databases, common: dict[str, Any]
) -> None:
    kinds: list[tuple[str, int]] = [("floor", 0)]
    for tree in range(len(bench.etl_paths)):
        kinds += [("new", tree), ("registered", tree)]
    with dbs.fresh() as registered:
        setup = bench.run("sync", registered)  # a complete first pass fills it
        emit({"type": "setup", **common, "what": "registered database", **setup})
        for run in range(args.runs):
            turn = run % len(kinds)
            for kind, tree in kinds[turn:] + kinds[:turn]:  # each goes first in turn
                with contextlib.ExitStack() as stack:
                    if kind == "floor":
                        mode, url = "floor", None
                    elif kind == "new":
                        mode, url = "sync", stack.enter_context(dbs.fresh())
                    else:
                        mode, url = "sync", registered
                    done = bench.first_request(mode, url, args.first_request_timeout, tree)
                line = {"type": "first_request", "run": run, "kind": kind, **common}
                if mode == "sync":
                    line["etl_path"] = str(bench.etl_paths[tree])
                line["first_request_s"] = _round(done.first_request_s)
                line["loadavg_1m"] = round(os.getloadavg()[0], 2)
                bench.records[kind if tree == 0 else f"{kind}@{tree}"].append(line)
                emit(line)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def summarise_phases(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    floors = {(r["run"], r["tick"]): r for r in records["floor"]}
    out: dict[str, Any] = {}
    for phase in ("cold", "steady", "nochange"):
        syncs = [r for r in records["sync"] if r["phase"] == phase]
        if syncs:
            out[phase] = _phase_entry([(floors[(r["run"], r["tick"])], r) for r in syncs])
    syncs = records["sync"]
    out["every_sync_ok"] = bool(syncs) and all(
        r["exit_code"] == 0 and set(r["statuses"]) <= {"ok"} for r in syncs
    )
    out["every_floor_ok"] = all(r["exit_code"] == 0 for r in records["floor"])
    return out


def _phase_entry(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Medians over a phase's (floor, sync) pairs."""
    floors, syncs = [f for f, _ in pairs], [s for _, s in pairs]
    return {
        "pairs": len(pairs),
        "floor_wall_s": _median([f["wall_s"] for f in floors]),
        "sync_wall_s": _median([s["wall_s"] for s in syncs]),
        "ratio_vs_floor": _median([s["wall_s"] / f["wall_s"] for f, s in pairs]),
        "floor_cpu_s": _median([f["cpu_s"] for f in floors]),
        "sync_cpu_s": _median([s["cpu_s"] for s in syncs]),
        "cpu_ratio_vs_floor": _median([s["cpu_s"] / f["cpu_s"] for f, s in pairs]),
        "sync_db_cpu_s": _median([s["db_cpu_s"] for s in syncs]),
        "sync_peak_rss_mb": max(s["peak_rss_mb"] for s in syncs),
        "sync_peak_rss_mb_median": _median([s["peak_rss_mb"] for s in syncs]),
        "floor_peak_rss_mb": max(f["peak_rss_mb"] for f in floors),
    }


def summarise_first_request(
    records: dict[str, list[dict[str, Any]]], trees: Sequence[Path]
) -> dict[str, Any]:
    """Medians per kind: ``floor``, then ``new`` and ``registered`` of the first tree at the
    top level and of every tree under ``trees``."""
    out: dict[str, Any] = {"floor": _first_request_stats(records["floor"])}
    out["trees"] = [
        {"etl_path": str(path)}
        | {
            kind: _first_request_stats(records[kind if n == 0 else f"{kind}@{n}"])
            for kind in ("new", "registered")
        }
        for n, path in enumerate(trees)
    ]
    out |= {kind: out["trees"][0][kind] for kind in ("new", "registered")}
    out["goals"] = {
        f"{kind}_first_request_within_{FIRST_REQUEST_GOAL_S:g}s": out[kind]["median_s"] is not None
        and out[kind]["median_s"] <= FIRST_REQUEST_GOAL_S
        for kind in ("new", "registered")
    }
    return out


def _first_request_stats(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = [r["first_request_s"] for r in lines]
    present = [v for v in values if v is not None]
    return {
        "runs": len(values),
        "median_s": _median(present),
        "min_s": _round(min(present, default=None)),
        "max_s": _round(max(present, default=None)),
        "missing": len(values) - len(present),
    }


def merge_profiles(out: Path, lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The profiled passes' collapsed stacks summed into ``out`` (line numbers dropped, so
    that a function is one frame), and its top functions."""
    files = [Path(r["py_spy"]) for r in lines if "py_spy" in r and Path(r["py_spy"]).exists()]
    stacks: Counter[str] = Counter()
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                frames = (_LINE_NO.sub(")", frame) for frame in stack.split(";"))
                stacks[";".join(frames)] += int(count)
    out.write_text("".join(f"{k} {n}\n" for k, n in stacks.most_common()), encoding="utf-8")
    return {"file": str(out), "passes": len(files), **hotspots(str(out), top=25)}


# --- the command line --------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = {
        "instances": args.instances,
        "chats": args.chats,
        "workers": args.workers,
        "change_rate": args.change_rate,
        "decoder": args.decoder,
    }
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(
            SimProcess(
                instances=args.instances,
                chats=args.chats,
                seed=args.seed,
                change_rate=args.change_rate,
            )
        )
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsync-proc-")))
        config = work / "etl.toml"
        write_config(config, sim, workers=args.workers)
        dbs = Databases(args.database_url, stack, keep=args.keep)
        launcher = Launcher()
        stack.callback(launcher.close)
        common["backend"] = "postgresql" if dbs.backend == "postgresql" else "sqlite"
        bench = Bench(
            sim=sim,
            config=config,
            work=work,
            workers=args.workers,
            etl_paths=args.etl_path,
            decoder=args.decoder,
            db_sample_seconds=args.db_sample_seconds,
            log_level=args.log_level,
            launcher=launcher,
            py_spy=args.py_spy.resolve() if args.py_spy else None,
        )
        for tree in bench.etl_paths:  # no measured process compiles the bytecode it imports
            compile_etl = [sys.executable, "-m", "compileall", "-q", str(tree / "etl")]
            subprocess.run(compile_etl, check=True)
        sim.prepare()
        if args.first_request:
            run_first_request(args, bench, dbs, common)
            result = summarise_first_request(bench.records, bench.etl_paths)
        else:
            run_phases(args, bench, dbs, common)
            result = summarise_phases(bench.records)
            if bench.py_spy is not None:
                result["profile"] = merge_profiles(bench.py_spy, bench.records["sync"])
    summary = {"type": "summary", "mode": "first_request" if args.first_request else "phases"}
    summary |= {**common, "etl_path": [str(path) for path in args.etl_path], **result}
    emit(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Whole processes: `etl sync --once` against the floor, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("ETL_BENCH_DATABASE_URL", "sqlite://"),
        help="PostgreSQL server URL (throwaway databases bench_<random> are created on it "
        "and dropped afterwards) or sqlite:// (temporary files)",
    )
    p.add_argument(
        "--instances", type=int, default=None, help="default 100; 10,000 with --first-request"
    )
    p.add_argument(
        "--chats",
        type=int,
        default=None,
        help="chats per instance (default 500; 5 with --first-request)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs (each into a new database)")
    p.add_argument("--ticks", type=int, default=3, help="steady passes per run")
    p.add_argument("--nochange-ticks", type=int, default=1, help="no-change passes per run")
    p.add_argument("--change-rate", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=8, help="threads of both processes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--decoder",
        choices=["orjson", "json"],
        default="orjson",
        help="how the floor decodes a body",
    )
    p.add_argument(
        "--log-level", default="INFO", help="the sync's --log-level (its log goes to a file)"
    )
    p.add_argument(
        "--etl-path",
        type=Path,
        action="append",
        help="the tree whose etl package the sync runs (default: this checkout); with "
        "--first-request, give it more than once to compare trees side by side",
    )
    p.add_argument("--db-sample-seconds", type=float, default=0.2)
    p.add_argument(
        "--first-request",
        action="store_true",
        help="measure the time to the first getChats request instead",
    )
    p.add_argument("--first-request-timeout", type=float, default=120.0)
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="run the sync processes of the --py-spy-phase passes under py-spy (the thread "
        "holding the GIL; collapsed stacks into FILE-<run>-<tick>.txt; their timings "
        "include py-spy's)",
    )
    p.add_argument("--py-spy-phase", default="steady", choices=["cold", "steady", "nochange"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instances is None:
        args.instances = 10_000 if args.first_request else 100
    if args.chats is None:
        args.chats = 5 if args.first_request else 500
    if min(args.instances, args.chats, args.runs, args.workers) < 1 or args.ticks < 0:
        raise SystemExit("--instances, --chats, --runs and --workers must be >= 1")
    if args.nochange_ticks < 0:
        raise SystemExit("--nochange-ticks must be >= 0")
    args.etl_path = [path.resolve() for path in args.etl_path or [ROOT]]
    if len(args.etl_path) > 1 and not args.first_request:
        raise SystemExit("several --etl-path are compared with --first-request only")
    summary = run(args)
    if summary["mode"] == "phases" and not summary["every_sync_ok"]:
        print("some sync did not end ok", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

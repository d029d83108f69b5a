"""Fleet benchmark: K ticks of the real sync path for N instances x M chats.

    python benchmarks/fleet.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --instances 1000 --chats 500 --ticks 5

What it runs is the daemon's code: ``GreenApiClient`` -> ``decode_chats`` -> ``Syncer.sync``
(diff and one write transaction per instance), for every instance, through a
``ThreadPoolExecutor`` of ``--workers`` threads (the daemon's ``max_workers``, default 8),
against the Green-API simulator (``etl.simulator``) running in a process of its own and
driven over a ``multiprocessing`` pipe.

A run is: one cold tick (empty database), ``--ticks`` steady ticks (the simulator is
stepped before each, changing about ``--change-rate`` of the chats), one no-change tick
(same lists again) and ``--takeover`` steady ticks each by a new ``Syncer`` (nothing in
memory, as a replica that has just taken the instances over). By default each tick is run
twice on the same simulator state: first the *floor* (fetch + decode + normalise through
the same client and thread pool, no database), then the *db* pass (the full sync); the
summary's ratios come from these side by side pairs, because absolute times drift on a
shared machine. ``--floor`` runs only the
floor, ``--no-floor`` only the db pass.

Output: one JSON line per pass (``"type": "tick"``), then one ``"type": "summary"`` line.
Fields of a tick line:

- ``wall_s``: wall time of the pass; ``cpu_s``: CPU seconds of this process (all threads,
  ``time.process_time``); ``sim_cpu_s``: CPU seconds of the simulator process;
  ``db_cpu_s``: CPU seconds of the PostgreSQL backends serving this benchmark's database
  (background writer/WAL writer/checkpointer not included; null on SQLite).
- ``http_requests``: getChats requests the simulator answered during the pass.
- ``statements``: SQL statements sent to the driver (an ``executemany`` counts as one;
  SQLAlchemy's batched "insertmanyvalues" counts one per batch), by verb;
  ``statement_rows``: parameter sets sent.
- ``rows_written``: rows inserted/updated per table (the driver's ``rowcount``).
- ``changes``: what the syncs reported (``chats_inserted`` ... ``ephemeral_changes``),
  summed over the instances; ``statuses``: outcomes by status.
- ``snapshot_mb``: what the packed snapshots the syncer keeps between ticks take (their
  arrays and joined ids, not Python's object headers).
- ``rss_mb``: resident memory of this process after the pass; ``peak_rss_mb``: the
  process's peak so far (``ru_maxrss``). The simulator's memory is not included: it runs in
  its own process (reported as ``sim_rss_mb``).

Before a steady tick the simulator evolves and re-serialises every list (outside the
timed pass), as Green-API would have the list ready; the pass itself only serves it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing the package itself
    sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402
from sqlalchemy import Engine, bindparam, create_engine, event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

import etl.sync.store  # noqa: E402
from etl.client import GreenApiClient  # noqa: E402
from etl.config import Instance, SchedulerSettings  # noqa: E402
from etl.db import make_engine, normalise_url, upgrade  # noqa: E402
from etl.payload import decode_chats  # noqa: E402
from etl.redact import register_secret  # noqa: E402
from etl.sync import Syncer, SyncOutcome, register_instances  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: how a change rate is split over the simulator's kinds of change (sums to 1)
CHANGE_MIX = {"new": 0.2, "rename": 0.25, "archive": 0.2, "ephemeral": 0.25, "removal": 0.1}

GOALS = {
    "steady_vs_floor": 1.5,
    "cold_vs_floor": 3.0,
    "peak_rss_mb_at_1000x500": 300.0,
    "tick_seconds_for_one_minute_interval": 60.0,
}


# --- process metrics ---------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc); 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int | None = None) -> float:
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the simulator in its own process ----------------------------------------------------


def change_rates(change_rate: float) -> dict[str, float]:
    return {kind: change_rate * share for kind, share in CHANGE_MIX.items()}


def _sim_main(conn: Any, instances: int, chats: int, seed: int, rates: dict[str, float]) -> None:
    """Child process: serve the simulator; obey commands from the pipe until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from etl.simulator import ChangeRates, Simulator

    sim = Simulator(instances=instances, chats=chats, seed=seed, rates=ChangeRates(**rates))
    sim.start()

    def prepare() -> float:
        # Evolve every instance and serialise its list now, outside the timed passes
        # (the simulator otherwise does it lazily on the first request after a step).
        t0 = time.perf_counter()
        for iid in sim.instance_ids:
            sim._payload(sim._get(iid), None)  # noqa: SLF001 - the benchmark's own tool
        return time.perf_counter() - t0

    conn.send({"url": sim.url, "tokens": {i: sim.token_for(i) for i in sim.instance_ids}})
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "prepare":
                conn.send(prepare())
            elif cmd == "step":
                sim.step(arg)
                conn.send(prepare())
            elif cmd == "requests":
                conn.send(sim.request_count())
            elif cmd == "first_request":  # the first getChats received at or after arg
                times = [r.at for r in sim.requests if r.method == "getChats" and r.at >= arg]
                conn.send(min(times, default=None))
            elif cmd == "reset":
                sim.reset_counts()
                conn.send(None)
            elif cmd == "stop":
                break
            else:
                conn.send(ValueError(f"unknown command {cmd!r}"))
    finally:
        sim.stop()
        with contextlib.suppress(OSError):
            conn.send("stopped")


class SimProcess:
    """The simulator in a child process, stepped and queried through a pipe."""

    def __init__(self, *, instances: int, chats: int, seed: int, change_rate: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_sim_main,
            args=(child, instances, chats, seed, change_rates(change_rate)),
            name="chatsync-simulator",
            daemon=True,
        )
        self.proc.start()
        child.close()
        hello = self._conn.recv()
        self.url: str = hello["url"]
        self.tokens: dict[int, str] = hello["tokens"]
        self._lock = threading.Lock()

    def _call(self, cmd: str, arg: Any = None) -> Any:
        with self._lock:
            self._conn.send((cmd, arg))
            answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def prepare(self) -> float:
        return float(self._call("prepare"))

    def step(self, n: int = 1) -> float:
        return float(self._call("step", n))

    def requests(self) -> int:
        return int(self._call("requests"))

    def first_request(self, since: float) -> float | None:
        """When the simulator received its first getChats request at or after ``since``
        (``time.monotonic()``, a clock every process of the machine shares), or None."""
        at = self._call("first_request", since)
        return None if at is None else float(at)

    def reset(self) -> None:
        """Forget the requests received so far (their log and counts)."""
        self._call("reset")

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def stop(self) -> None:
        if not self.proc.is_alive():
            return
        with contextlib.suppress(OSError, EOFError):
            self._conn.send(("stop", None))
            self._conn.recv()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_instances(sim: SimProcess, *, interval: int = 60) -> list[Instance]:
    out = []
    for number, (iid, token) in enumerate(sorted(sim.tokens.items()), start=1):
        register_secret(token)
        out.append(
            Instance(
                id_instance=iid,
                label=f"bench {number}",
                api_url=sim.url,
                token=SecretStr(token),
                count=None,
                enabled=True,
                interval_seconds=interval,
                timeout_seconds=30.0,
                connect_timeout_seconds=5.0,
                max_attempts=4,
                mass_removal_threshold=0.5,
                mass_removal_confirmations=3,
            )
        )
    return out


# --- SQL accounting ----------------------------------------------------------------------

_VERB = re.compile(r"\s*(\w+)")
_WRITE_TABLE = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?(\w+)", re.I)


@dataclass
class SqlCounter:
    """Statements, parameter sets and written rows, from engine events (thread-safe)."""

    statements: Counter[str] = field(default_factory=Counter)
    param_sets: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        # a combined statement's cursor counts only its last part's rows
        etl.sync.store.written_listeners.append(self._written)

    def _written(self, table: str, rows: int) -> None:
        with self.lock:
            self.rows[table] += rows

    def _before(
        self, conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool
    ) -> None:
        m = _VERB.match(statement)
        verb = m.group(1).upper() if m else "?"
        n = len(params) if many and params is not None else 1
        with self.lock:
            self.statements[verb] += 1
            self.param_sets += n

    def _after(
        self, conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool
    ) -> None:
        m = _WRITE_TABLE.match(statement)
        if m is None:
            return
        count = cursor.rowcount
        if count is None or count < 0:  # unknown: count the parameter sets
            count = len(params) if many and params is not None else 1
        with self.lock:
            self.rows[m.group(1)] += count

    def snapshot(self) -> tuple[Counter[str], int, Counter[str]]:
        with self.lock:
            return Counter(self.statements), self.param_sets, Counter(self.rows)


# --- databases ---------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(url: str, *, keep: bool = False) -> Iterator[str]:
    """A fresh, empty database for the run: ``bench_<random>`` on the PostgreSQL server of
    ``url`` (dropped afterwards unless ``keep``), or a new SQLite file (a temporary one when
    ``url`` names none; a named file must not exist yet)."""
    u = make_url(normalise_url(url))
    if u.get_backend_name() == "sqlite":
        path = u.database
        if not path or path == ":memory:":
            with tempfile.TemporaryDirectory(prefix="chatsync-bench-") as tmp:
                yield f"sqlite:///{Path(tmp) / 'bench.db'}"
            return
        if Path(path).exists():
            raise SystemExit(f"{path} exists: the benchmark needs a new file (remove it first)")
        try:
            yield f"sqlite:///{path}"
        finally:
            if not keep:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(path + suffix).unlink()
        return
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(u, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield u.set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def backend_pids(engine: Engine) -> set[int]:
    """PostgreSQL backend pids connected to this engine's database (empty on SQLite)."""
    if engine.dialect.name != "postgresql":
        return set()
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        )
        return {int(r[0]) for r in rows}


# --- one pass over the fleet -------------------------------------------------------------


OUTCOME_FIELDS = (
    "chats_received",
    "chats_inserted",
    "chats_updated",
    "chats_removed",
    "chats_rejected",
    "ephemeral_changes",
)


@dataclass
class Pass:
    """Runs one tick's work for every instance through the pool and measures it."""

    sim: SimProcess
    pool: ThreadPoolExecutor
    instances: Sequence[Instance]
    engine: Engine | None = None
    counter: SqlCounter | None = None

    def run(self, mode: str, work: Callable[[Instance], Any]) -> tuple[dict[str, Any], list[Any]]:
        requests0 = self.sim.requests()
        sim_cpu0 = proc_cpu_seconds(self.sim.pid)
        pids0 = backend_pids(self.engine) if mode == "db" and self.engine else set()
        db_cpu0 = {p: proc_cpu_seconds(p) for p in pids0}
        sql0 = self.counter.snapshot() if self.counter and mode == "db" else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = list(self.pool.map(work, self.instances))
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        sim_cpu = proc_cpu_seconds(self.sim.pid) - sim_cpu0
        line: dict[str, Any] = {
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "sim_cpu_s": round(sim_cpu, 4),
            "db_cpu_s": None,
            "http_requests": self.sim.requests() - requests0,
        }
        if mode == "db" and self.engine is not None and self.engine.dialect.name == "postgresql":
            pids = pids0 | backend_pids(self.engine)
            # a backend that exited during the pass (a pool's overflow connection closed)
            # reads 0.0: its CPU is lost either way, and subtracting its start would count
            # it negative
            now = {p: proc_cpu_seconds(p) for p in pids}
            line["db_cpu_s"] = round(
                sum(cpu - db_cpu0.get(p, 0.0) for p, cpu in now.items() if cpu or p not in pids0),
                4,
            )
        if sql0 is not None and self.counter is not None:
            st1, ps1, rows1 = self.counter.snapshot()
            st = st1 - sql0[0]
            line["statements"] = {"total": sum(st.values()), **dict(sorted(st.items()))}
            line["statement_rows"] = ps1 - sql0[1]
            line["rows_written"] = dict(sorted((rows1 - sql0[2]).items()))
        return line, results


def floor_work(client: GreenApiClient) -> Callable[[Instance], int]:
    def work(instance: Instance) -> int:
        fetched = client.get_chats(instance)
        decoded = decode_chats(fetched.body)
        incoming = {c.chat_id: c for c in decoded.chats}  # what the sync builds first
        return len(incoming)

    return work


def summarise_outcomes(outcomes: Sequence[SyncOutcome]) -> tuple[dict[str, int], dict[str, int]]:
    changes = {f: sum(getattr(o, f) for o in outcomes) for f in OUTCOME_FIELDS}
    statuses = dict(Counter(o.status for o in outcomes))
    return changes, statuses


# --- the run -----------------------------------------------------------------------------


def tick_plan(ticks: int, *, no_change: bool = True, takeover: int = 0) -> list[str]:
    plan = ["cold"] + ["steady"] * ticks + (["nochange"] if no_change else [])
    return plan + ["takeover"] * takeover


def emit(line: dict[str, Any], out: Any = None) -> None:
    print(json.dumps(line, ensure_ascii=False), file=out or sys.stdout, flush=True)


def setup_daemon_logging(level: str, path: str) -> None:
    """Log like the daemon (INFO, one line per instance per tick, through the redaction
    filter), into ``path`` instead of stderr so that it does not mix with the JSON lines."""
    from etl.logs import setup_logging

    setup_logging(level)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_etl", False) and isinstance(handler, logging.StreamHandler):
            handler.setStream(open(path, "a", encoding="utf-8"))  # noqa: SIM115


class PySpy:
    """``py-spy record`` of this process, only while a block runs (the steady db ticks)."""

    def __init__(self, out: str, rate: int = 200, *, gil: bool = True) -> None:
        self.out, self.rate, self.gil = out, rate, gil
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        fmt = "raw" if self.out.endswith((".txt", ".folded", ".raw")) else "speedscope"
        if self.out.endswith(".svg"):
            fmt = "flamegraph"
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(os.getpid()), "--rate", str(self.rate)]
            + ["--format", fmt, "--output", self.out, "--nonblocking"]
            + (["--gil"] if self.gil else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let it attach

    def pause(self) -> None:
        """Stop sampling between profiled blocks (SIGSTOP the sampler, SIGCONT to go on)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is None:
            self.start()
        else:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -signal.SIGINT):
            print(err.decode(errors="replace")[-2000:], file=sys.stderr)
        self.proc = None


_LINE_NO = re.compile(r":\d+\)$")


def hotspots(collapsed: str, top: int = 15) -> dict[str, list[tuple[float, str]]]:
    """Top functions of a py-spy collapsed-stack file (``--py-spy x.txt``), by share of the
    samples: ``self`` (the function itself was running) and ``total`` (it was on the stack)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(collapsed, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = [_LINE_NO.sub(")", fr) for fr in stack.split(";")]
            own[frames[-1]] += n
            for fr in set(frames):
                total[fr] += n
    if not samples:
        return {"self": [], "total": []}
    return {
        kind: [(round(100 * n / samples, 1), fn) for fn, n in c.most_common(top)]
        for kind, c in (("self", own), ("total", total))
    }


def persists(args: argparse.Namespace) -> bool:
    """Whether the syncer writes its snapshots into ``instance_snapshots``."""
    if args.persist_snapshots:
        return True
    return bool(args.compact_snapshots and not args.no_persist_snapshots)


def new_syncer(engine: Engine, client: GreenApiClient, args: argparse.Namespace) -> Syncer:
    """The daemon's syncer as the arguments configure it."""
    return Syncer(
        engine,
        client,
        compact_snapshots=args.compact_snapshots,
        persist_snapshots=persists(args),
        persist_every=args.persist_every,
    )


def take_over(
    old: Syncer, client: GreenApiClient, args: argparse.Namespace, instances: list[Instance]
) -> tuple[Syncer, dict[str, Any] | None]:
    """A syncer with nothing in memory, as a replica that has just taken the instances over
    (or a restarted daemon): it reads the persisted snapshots (written with
    --compact-snapshots, or by the old syncer with --hand-over, as `etl run` does when it
    stops or hands instances back; else every --persist-every ticks, some ticks old, and
    topped up from the rows written since; without any, it rebuilds them from the rows)."""
    hand_over = None
    if args.hand_over:
        t0 = time.perf_counter()
        written = old.persist_held()
        hand_over = {"written": written, "s": round(time.perf_counter() - t0, 4)}
    new = new_syncer(old.engine, client, args)
    if args.preload_ahead:
        # as `etl run` does at its start and for the instances it claims: a few
        # statements read the snapshots ahead of the ticks, on a thread of their own
        new.preload_ahead(instances)
    return new, hand_over


def run(args: argparse.Namespace, out: Any = None) -> dict[str, Any]:
    """Run the benchmark; prints the JSON lines and returns the summary."""
    modes = ["floor"] if args.floor else (["db"] if args.no_floor else ["floor", "db"])
    plan = tick_plan(args.ticks, no_change=not args.no_nochange, takeover=args.takeover)
    common = {
        "instances": args.instances,
        "chats": args.chats,
        "workers": args.workers,
        "change_rate": args.change_rate,
    }
    if args.log_level:
        setup_daemon_logging(args.log_level, args.log_file)
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(
            SimProcess(
                instances=args.instances,
                chats=args.chats,
                seed=args.seed,
                change_rate=args.change_rate,
            )
        )
        instances = make_instances(sim)
        client = GreenApiClient(pool_maxsize=args.workers)
        stack.callback(client.close)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=args.workers))
        engine = counter = syncer = None
        backend = None
        register_s = None
        if "db" in modes:
            url = stack.enter_context(scratch_database(args.database_url, keep=args.keep))
            engine = make_engine(url, pool_size=args.workers)
            stack.callback(engine.dispose)
            backend = engine.dialect.name
            upgrade(engine)
            if args.drop_foreign_keys:
                common["dropped_foreign_keys"] = drop_foreign_keys(engine)
            if args.drop_change_seq_indexes:
                common["dropped_indexes"] = drop_change_seq_indexes(engine)
            counter = SqlCounter()
            counter.attach(engine)
            t0 = time.perf_counter()
            register_instances(engine, instances)
            register_s = round(time.perf_counter() - t0, 4)
            syncer = new_syncer(engine, client, args)
        common["backend"] = backend
        common["compact_snapshots"] = args.compact_snapshots
        common["persist_snapshots"] = persists(args)
        common["persist_every"] = args.persist_every
        common["preload_ahead"] = args.preload_ahead
        runner = Pass(sim, pool, instances, engine, counter)
        prepare_s = sim.prepare()
        profiler = PySpy(args.py_spy, gil=not args.py_spy_all) if args.py_spy else None
        for number, phase in enumerate(plan):
            if phase in ("steady", "takeover"):
                prepare_s = sim.step(1)
            hand_over = None
            if phase == "takeover" and syncer is not None:
                syncer, hand_over = take_over(syncer, client, args, instances)
            elif phase == "nochange":
                prepare_s = 0.0
            for mode in modes:
                # profile the db passes of one phase (the floor's, with --floor)
                profile_this = (
                    profiler is not None and phase == args.py_spy_phase and mode == modes[-1]
                )
                if profile_this:
                    assert profiler is not None
                    profiler.resume()
                if mode == "floor":
                    line, decoded = runner.run("floor", floor_work(client))
                    line["chats_decoded"] = sum(decoded)
                else:
                    assert syncer is not None
                    groups0 = Counter(syncer.group_sizes)
                    line, outcomes = runner.run("db", syncer.sync)
                    groups = syncer.group_sizes - groups0
                    n_groups = sum(groups.values())
                    line["write_groups"] = {  # ticks written per transaction (group commit)
                        "count": n_groups,
                        "mean_size": round(sum(k * v for k, v in groups.items()) / n_groups, 2)
                        if n_groups
                        else None,
                        "max_size": max(groups, default=None),
                    }
                    line["changes"], line["statuses"] = summarise_outcomes(outcomes)
                    # the packed snapshots this process keeps between ticks
                    line["snapshot_mb"] = round(syncer.snapshots.packed_bytes() / 2**20, 2)
                    if hand_over is not None:
                        line["hand_over"] = hand_over
                    failed = [o for o in outcomes if o.status == "failed"]
                    if failed:
                        line["errors"] = dict(Counter(o.error_kind for o in failed))
                        line["first_error"] = failed[0].error
                        print(
                            f"tick {number}: {len(failed)} syncs failed: {failed[0].error}",
                            file=sys.stderr,
                        )
                if profile_this:
                    assert profiler is not None
                    profiler.pause()
                line = {
                    "type": "tick",
                    "tick": number,
                    "phase": phase,
                    "mode": mode,
                    **common,
                    **line,
                    "sim_prepare_s": round(prepare_s, 4),
                    "rss_mb": round(proc_rss_mb(), 1),
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                    "sim_rss_mb": round(proc_rss_mb(sim.pid), 1),
                }
                records[mode].append(line)
                emit(line, out)
        if profiler is not None:
            profiler.stop()
    summary = summarise(records, common, register_s)
    if args.py_spy and args.py_spy.endswith(".txt") and os.path.exists(args.py_spy):
        summary["profile"] = {"file": args.py_spy, **hotspots(args.py_spy)}
    emit(summary, out)
    return summary


def summarise(
    records: dict[str, list[dict[str, Any]]], common: dict[str, Any], register_s: float | None
) -> dict[str, Any]:
    floor = {(r["tick"]): r for r in records.get("floor", [])}
    db = {(r["tick"]): r for r in records.get("db", [])}

    def phase_ticks(mode_records: dict[int, dict[str, Any]], phase: str) -> list[int]:
        return [t for t, r in mode_records.items() if r["phase"] == phase]

    def med(values: list[float]) -> float | None:
        return round(statistics.median(values), 4) if values else None

    summary: dict[str, Any] = {"type": "summary", **common, "register_s": register_s}
    ref = db or floor
    for phase in ("cold", "steady", "nochange", "takeover"):
        ticks = phase_ticks(ref, phase)
        if phase == "takeover" and not ticks:
            continue
        entry: dict[str, Any] = {"ticks": len(ticks)}
        if floor:
            entry["floor_wall_s"] = med([floor[t]["wall_s"] for t in ticks if t in floor])
            entry["floor_cpu_s"] = med([floor[t]["cpu_s"] for t in ticks if t in floor])
        if db:
            rs = [db[t] for t in ticks]
            entry["db_wall_s"] = med([r["wall_s"] for r in rs])
            entry["db_cpu_s_process"] = med([r["cpu_s"] for r in rs])
            handed = [r["hand_over"]["s"] for r in rs if "hand_over" in r]
            if handed:
                entry["hand_over_s"] = med(handed)
            entry["db_server_cpu_s"] = med([r["db_cpu_s"] for r in rs if r["db_cpu_s"] is not None])
            entry["statements"] = med([r["statements"]["total"] for r in rs])
            rows: Counter[str] = Counter()
            changes: Counter[str] = Counter()
            for r in rs:
                rows.update(r["rows_written"])
                changes.update(r["changes"])
            entry["rows_written_per_tick"] = {k: round(v / len(rs), 1) for k, v in rows.items()}
            entry["changes_per_tick"] = {k: round(v / len(rs), 1) for k, v in changes.items()}
            changed = sum(
                changes[k] for k in ("chats_inserted", "chats_updated", "chats_removed")
            ) / max(1, len(rs))
            entry["changed_chats_per_tick"] = round(changed, 1)
            entry["chats_rows_per_changed_chat"] = (
                round(rows.get("chats", 0) / len(rs) / changed, 3) if changed else None
            )
        if floor and db:
            pairs = [db[t]["wall_s"] / floor[t]["wall_s"] for t in ticks if t in floor]
            entry["ratio_vs_floor"] = med(pairs)  # median of the side-by-side pairs
        summary[phase] = entry
    allr = [r for rs in records.values() for r in rs]
    summary["peak_rss_mb"] = max((r["peak_rss_mb"] for r in allr), default=None)
    summary["sim_peak_rss_mb"] = max((r["sim_rss_mb"] for r in allr), default=None)
    goals: dict[str, Any] = {}
    steady, cold, nochange = summary["steady"], summary["cold"], summary["nochange"]
    if "ratio_vs_floor" in steady:
        goals["steady_le_1.5x_floor"] = steady["ratio_vs_floor"] <= GOALS["steady_vs_floor"]
    if "ratio_vs_floor" in cold:
        goals["cold_le_3x_floor"] = cold["ratio_vs_floor"] <= GOALS["cold_vs_floor"]
    if db and nochange.get("ticks"):
        w = nochange["rows_written_per_tick"]
        goals["nochange_writes_no_chat_or_history_rows"] = (
            w.get("chats", 0) == 0 and w.get("chat_ephemeral_history", 0) == 0
        )
    if common["instances"] * common["chats"] >= 500_000 and summary["peak_rss_mb"] is not None:
        goals["peak_rss_le_300mb"] = summary["peak_rss_mb"] <= GOALS["peak_rss_mb_at_1000x500"]
    if db and steady.get("db_wall_s") is not None:
        goals["steady_tick_fits_60s_interval"] = steady["db_wall_s"] <= 60.0
    if db:
        goals["every_sync_ok"] = all(set(r["statuses"]) <= {"ok"} for r in db.values())
    summary["goals"] = goals
    return summary


#: the tables a first load writes a row per chat into
CHAT_TABLES = ("chats", "chat_ephemeral_history", "chat_events", "chat_presence")


def drop_change_seq_indexes(engine: Engine) -> list[str]:
    """Drop the ``change_seq`` index of each chat-level table (an experiment: what keeping
    the incremental-load cursor indexed costs a first load). Returns their names."""
    names = [f"ix_{table}_change_seq" for table in CHAT_TABLES]
    with engine.begin() as conn:
        for name in names:
            conn.execute(text(f'DROP INDEX "{name}"'))
    return names


def drop_foreign_keys(engine: Engine) -> list[str]:
    """Drop every foreign key of the chat-level tables (an experiment: what the per-row
    checks cost; see docs/benchmarks.md). Returns their names."""
    with engine.begin() as conn:
        names = [
            (r.table_name, r.constraint_name)
            for r in conn.execute(
                text(
                    "SELECT table_name, constraint_name FROM information_schema.table_constraints "
                    "WHERE constraint_type = 'FOREIGN KEY' AND table_name IN :t "
                    "ORDER BY table_name, constraint_name"
                ).bindparams(bindparam("t", expanding=True)),
                {"t": list(CHAT_TABLES)},
            )
        ]
        for table, name in names:
            conn.execute(text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
    return [name for _, name in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fleet benchmark of the real chatsync sync path against the simulator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("ETL_BENCH_DATABASE_URL", "sqlite://"),
        help="PostgreSQL server URL (a throwaway database bench_<random> is created on it "
        "and dropped afterwards) or a SQLite URL (a new file; sqlite:// = a temporary one)",
    )
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--chats", type=int, default=500, help="chats per instance")
    p.add_argument("--ticks", type=int, default=5, help="steady-state ticks")
    p.add_argument(
        "--change-rate", type=float, default=0.01, help="fraction of chats changed per tick"
    )
    p.add_argument("--workers", type=int, default=8, help="parallel syncs (daemon max_workers)")
    p.add_argument("--seed", type=int, default=1)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--floor", action="store_true", help="fetch + decode only, no database")
    mode.add_argument("--no-floor", action="store_true", help="db passes only, no floor pairs")
    p.add_argument("--no-nochange", action="store_true", help="skip the final no-change tick")
    p.add_argument(
        "--takeover",
        type=int,
        default=0,
        help="then this many steady ticks by a new syncer each (nothing in memory: a replica "
        "taking the instances over, a restart)",
    )
    p.add_argument(
        "--compact-snapshots",
        action="store_true",
        help="the daemon's [scheduler] compact_snapshots: snapshots packed between ticks and "
        "persisted each tick",
    )
    p.add_argument(
        "--hand-over",
        action="store_true",
        help="before each --takeover tick, the old syncer writes the snapshots it keeps, as "
        "`etl run` does when it stops or hands instances back ([scheduler] "
        "persist_on_release); timed apart as hand_over_s",
    )
    p.add_argument(
        "--persist-snapshots",
        action="store_true",
        help="experiment: snapshots kept as dicts (the default) but each tick writes its own "
        "into instance_snapshots, as --compact-snapshots does (what persisting every tick "
        "costs without unpacking)",
    )
    p.add_argument(
        "--preload-ahead",
        action="store_true",
        help="the new syncer of each --takeover tick reads the persisted snapshots ahead of "
        "its ticks, in chunks, on a thread of its own, as `etl run` does at its start and "
        "for the instances it claims (else each tick reads its own)",
    )
    p.add_argument(
        "--persist-every",
        type=int,
        default=SchedulerSettings().persist_every_ticks,
        help="the daemon's [scheduler] persist_every_ticks: without --compact-snapshots, each "
        "instance's snapshot is written every this many ticks (and at its first load); 0: "
        "never (as before that setting)",
    )
    p.add_argument(
        "--no-persist-snapshots",
        action="store_true",
        help="experiment: with --compact-snapshots, keep the snapshots packed between ticks "
        "but write none into instance_snapshots (what persisting costs apart from packing)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        help="log like the daemon at this level (into --log-file); '' to not set up logging",
    )
    p.add_argument("--log-file", default=os.devnull)
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    p.add_argument(
        "--drop-foreign-keys",
        action="store_true",
        help="experiment: drop the foreign keys of chats, history, events and presence after "
        "migrating (never done by chatsync; measures what the per-row checks cost)",
    )
    p.add_argument(
        "--drop-change-seq-indexes",
        action="store_true",
        help="experiment: drop the change_seq indexes of chats, history, events and presence "
        "after migrating (never done by chatsync; measures what they cost a first load)",
    )
    p.add_argument(
        "--py-spy",
        metavar="FILE",
        help="profile the db passes (the floor's with --floor) of the --py-spy-phase ticks "
        "with py-spy into FILE "
        "(.txt = collapsed stacks, .svg = flame graph, else speedscope JSON)",
    )
    p.add_argument(
        "--py-spy-phase",
        default="steady",
        choices=["cold", "steady", "nochange", "takeover"],
        help="which ticks --py-spy samples",
    )
    p.add_argument(
        "--py-spy-all",
        action="store_true",
        help="sample every thread, waiting ones too (default: only the thread holding the GIL, "
        "i.e. where this process spends its CPU)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instances < 1 or args.chats < 1 or args.ticks < 0 or args.workers < 1:
        raise SystemExit("--instances, --chats and --workers must be >= 1, --ticks >= 0")
    summary = run(args)
    failed = [k for k, ok in summary["goals"].items() if ok is False]
    if failed:
        print(f"goals missed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

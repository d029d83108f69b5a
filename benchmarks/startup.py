"""Where the start-up of ``etl sync --once`` goes: each step from the spawn to the first
getChats request, with N instances configured.

    python benchmarks/startup.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --instances 10000 --runs 5

Each run is a fresh Python process that runs ``etl sync --once`` with timers around the
steps of its start-up (the imports, reading the TOML file, validating it, resolving the
instances and their tokens, the engine, the schema check, registering the instances) and
exits when the first worker thread is about to send its first request: nothing is sent,
so no server is needed (the config points at a closed port). ``new`` runs go into an
empty migrated database (the process registers every instance), ``registered`` ones into a
database where they are registered already. ``--etl-path`` (repeatable) names the trees to
run, compared side by side; ``process.py --first-request`` measures the same start-up from
outside, through the simulator.

Output: one JSON line per run (``steps``: each step's start and end, seconds after the
spawn), then a summary line with the median duration of each step per kind and tree.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: (module, attribute, step): what the child times, in the order the command runs it
STEPS = (
    ("tomllib", "loads", "read the TOML"),
    ("etl.config", "parse_config", "validate (pydantic)"),
    ("etl.config", "resolve_instances", "resolve instances and tokens"),
    ("etl.cli", "make_engine", "engine"),
    ("etl.cli", "require_current_schema", "schema check"),
    ("etl.cli", "register_instances", "register instances"),
)


# --- the child: one timed start-up ---------------------------------------------------------


def child(argv: list[str]) -> None:
    """Run ``etl`` with ``argv`` in this process, timing each step; exit at the first send."""
    t0 = float(os.environ["STARTUP_T0"])  # time.monotonic() at the spawn, in the parent
    steps: list[tuple[str, float, float]] = [("interpreter", 0.0, time.monotonic() - t0)]
    begin = time.monotonic() - t0
    import importlib

    import etl.cli
    import etl.transport

    steps.append(("import etl.cli", begin, time.monotonic() - t0))
    for module, name, step in STEPS:
        _time(importlib.import_module(module), name, step, steps, t0)
    sent = threading.Lock()

    def first_send(*args: Any, **kwargs: Any) -> None:
        with sent:  # the first worker to get here reports; the others wait for the exit
            steps.append(("first request", time.monotonic() - t0, time.monotonic() - t0))
            print(json.dumps({"steps": steps}), flush=True)
            os._exit(0)

    etl.transport.RequestsTransport.send = first_send
    sys.argv = ["etl", *argv]
    etl.cli.main()


def _time(
    module: Any, name: str, step: str, steps: list[tuple[str, float, float]], t0: float
) -> None:
    real: Callable[..., Any] = getattr(module, name)

    @functools.wraps(real)
    def timed(*args: Any, **kwargs: Any) -> Any:
        begin = time.monotonic() - t0
        try:
            return real(*args, **kwargs)
        finally:
            steps.append((step, begin, time.monotonic() - t0))

    setattr(module, name, timed)


# --- the parent ----------------------------------------------------------------------------


def write_config(path: Path, instances: int) -> None:
    """``instances`` instances on a closed loopback port, tokens inline, owner-only."""
    lines = ["[defaults]", 'api_url = "http://127.0.0.1:9"']
    for n in range(instances):
        token = f"startup{n:08d}" + "0123456789abcdef" * 2
        lines += ["", "[[instances]]", f"id_instance = {1101000001 + n}"]
        lines += [f'api_token = "{token}"', f'label = "startup {n + 1}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


def one_run(tree: Path, config: Path, url: str, work: Path) -> list[tuple[str, float, float]]:
    from process import child_env

    env = child_env(tree)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", str(config)]
    cmd += ["--database-url", url, "sync", "--once", "--no-progress"]
    with open(work / "child.err", "wb") as err:
        env["STARTUP_T0"] = repr(time.monotonic())
        proc = subprocess.run(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=err)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (work / "child.err").read_text(errors="replace")[-2000:]
        raise SystemExit(f"the start-up run failed ({proc.returncode}):\n{tail}")
    steps: list[tuple[str, float, float]] = json.loads(proc.stdout)["steps"]
    return steps


def summarise(records: dict[tuple[str, int], list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (kind, tree), runs in sorted(records.items()):
        names = list(runs[0])
        out[f"{kind}@{tree}"] = {
            name: round(statistics.median(r[name] for r in runs if name in r), 4) for name in names
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fleet import emit
    from process import Databases

    trees = [path.resolve() for path in args.etl_path or [HERE.parent]]
    records: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsync-up-")))
        config = work / "etl.toml"
        write_config(config, args.instances)
        dbs = Databases(args.database_url, stack, keep=False)
        registered = stack.enter_context(dbs.fresh())
        for tree in trees:  # bytecode compiled, and the instances registered, before timing
            compile_etl = [sys.executable, "-m", "compileall", "-q", str(tree / "etl")]
            subprocess.run(compile_etl, check=True)
            one_run(tree, config, registered, work)
        kinds = [(kind, n) for n in range(len(trees)) for kind in ("new", "registered")]
        for number in range(args.runs):
            turn = number % len(kinds)
            for kind, n in kinds[turn:] + kinds[:turn]:  # each goes first in turn
                with contextlib.ExitStack() as run_stack:
                    url = registered
                    if kind == "new":
                        url = run_stack.enter_context(dbs.fresh())
                    steps = one_run(trees[n], config, url, work)
                durations = {name: round(end - begin, 4) for name, begin, end in steps}
                durations["first request"] = round(steps[-1][2], 4)  # since the spawn
                records[(kind, n)].append(durations)
                line = {"type": "startup", "run": number, "kind": kind, "etl_path": str(trees[n])}
                rounded = [(name, round(begin, 4), round(end, 4)) for name, begin, end in steps]
                emit(line | {"instances": args.instances, "steps": rounded})
    summary = {"type": "summary", "instances": args.instances, "runs": args.runs}
    summary |= {"etl_path": [str(t) for t in trees], "median_s": summarise(records)}
    emit(summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 1  # not reached unless the command ended before its first request
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default="sqlite://", help="a PostgreSQL server or sqlite://")
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--etl-path", type=Path, action="append", help="a tree to run (repeatable)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

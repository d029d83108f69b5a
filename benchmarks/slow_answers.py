"""The evidence behind the default read timeout (docs/green-api.md, "Slow answers").

Two measurements, against the simulator over loopback HTTP, with the real client:

1. A large account: how long fetching and decoding getChats takes for N chats, so that
   what our side needs of the tick's budget is known (median of ``--repeat`` runs).
2. A slow answer: the server takes ``--delay`` seconds before its first byte. With a read
   timeout shorter than that, every attempt is cut short (and starts the server's work
   again) until the tick's budget is gone; with one that the budget allows, the first
   attempt gets it. Timings are scaled down (``--interval``) so the run is short; the
   ratios are what carry over to the 60 s default.

Prints one JSON line per measurement. ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import SecretStr  # noqa: E402

from etl.client import BUDGET_SHARE, GreenApiClient  # noqa: E402
from etl.config import Defaults, Instance  # noqa: E402
from etl.errors import ApiError  # noqa: E402
from etl.payload import decode_chats  # noqa: E402
from etl.simulator import Fault, Simulator  # noqa: E402


def instance(sim: Simulator, **overrides: object) -> Instance:
    iid = sim.instance_ids[0]
    values: dict[str, object] = {
        "id_instance": iid,
        "label": "bench",
        "api_url": sim.url,
        "token": SecretStr(sim.token_for(iid)),
        "count": None,
        "enabled": True,
        "interval_seconds": 60,
        "timeout_seconds": Defaults().timeout_seconds,
        "connect_timeout_seconds": Defaults().connect_timeout_seconds,
        "max_attempts": Defaults().max_attempts,
        "mass_removal_threshold": 0.5,
        "mass_removal_confirmations": 3,
    }
    values.update(overrides)
    return Instance(**values)  # type: ignore[arg-type]


def large_account(sizes: list[int], repeat: int) -> None:
    for n in sizes:
        with Simulator(instances=1, chats=0, seed=1) as sim:
            inst = instance(sim)
            sim.set_fault(inst.id_instance, Fault(mode="huge", huge_count=n))
            client = GreenApiClient()
            fetch, decode = [], []
            size = 0
            try:
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    result = client.get_chats(inst)
                    t1 = time.perf_counter()
                    decoded = decode_chats(result.body, track=True)
                    t2 = time.perf_counter()
                    assert decoded.received == n
                    fetch.append(t1 - t0)
                    decode.append(t2 - t1)
                    size = len(result.body)
            finally:
                client.close()
        print(
            json.dumps(
                {
                    "type": "large_account",
                    "chats": n,
                    "body_mb": round(size / 2**20, 1),
                    "fetch_s": round(statistics.median(fetch), 3),
                    "decode_s": round(statistics.median(decode), 3),
                    "repeat": repeat,
                }
            ),
            flush=True,
        )


def slow_answer(delay: float, interval: int, timeouts: list[float]) -> None:
    budget = interval * BUDGET_SHARE
    for timeout in timeouts:
        with Simulator(instances=1, chats=50, seed=1) as sim:
            inst = instance(sim, interval_seconds=interval, timeout_seconds=timeout)
            sim.set_fault(inst.id_instance, Fault(delay=delay))
            client = GreenApiClient(backoff_initial=0.2, backoff_max=1.0)
            t0 = time.monotonic()
            try:
                result = client.get_chats(inst)
                outcome, attempts = "ok", result.attempts
            except ApiError as exc:
                outcome, attempts = str(exc.error_kind), exc.attempts
            finally:
                client.close()
            elapsed = time.monotonic() - t0
            served = sim.request_count(inst.id_instance)
        print(
            json.dumps(
                {
                    "type": "slow_answer",
                    "delay_s": delay,
                    "interval_s": interval,
                    "budget_s": budget,
                    "timeout_s": timeout,
                    "outcome": outcome,
                    "attempts": attempts,
                    "requests_served": served,
                    "elapsed_s": round(elapsed, 2),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000,100000", help="Chats per large account.")
    parser.add_argument("--repeat", type=int, default=5, help="Runs per size (median).")
    parser.add_argument("--delay", type=float, default=3.0, help="Seconds to the first byte.")
    parser.add_argument("--interval", type=int, default=10, help="Scaled-down interval (s).")
    parser.add_argument(
        "--timeouts",
        default="2.5,6.6",
        help="Read timeouts to try (s); the default pair is 15/60 and 40/60 of --interval "
        "(the old and the new default against the 60 s interval).",
    )
    args = parser.parse_args()
    large_account([int(n) for n in args.sizes.split(",")], args.repeat)
    slow_answer(args.delay, args.interval, [float(t) for t in args.timeouts.split(",")])


if __name__ == "__main__":
    main()

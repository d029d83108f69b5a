"""The soak's leak checks (``benchmarks/soak.py``, ``judge_resources``) fed synthetic samples:
each still reports a genuine leak, and none reports what warm-up on a busy machine does
(pools filling up at any time of the run, up to their size; a start-up that takes much of
a short run; a count that exceeds its bound for one sample). No database, no daemon, no
sleeping: the samples are made up, in the two shapes the soak runs in (the 60-second CI
run sampled every 2 s, the 10-minute run every 5 s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.soak import (
    FIXED_THREADS,
    LAZY_THREADS,
    SUSTAINED,
    Bounds,
    Sample,
    judge_resources,
    pool_capacity,
)
from etl.db import make_engine

WORKERS = 8
BOUNDS = Bounds(
    workers=WORKERS,
    pool_capacity=2 * WORKERS,  # what pool_capacity() reads from the daemon's engine
    fds_per_connection=1,
    rss_growth_mb=30.0,
    file_fd_growth=2,
)
HTTP = 3  # HTTP connections the client keeps open in these samples
SHAPES = [pytest.param(60.0, 2.0, id="ci-60s"), pytest.param(600.0, 5.0, id="soak-600s")]

Series = Callable[[float, float], float]  # (t, duration) -> value


def steady_rss(t: float, d: float) -> float:
    return 8.0 if t == 0 else 90.0 + (t % 7) * 0.1  # MB: the interpreter, then the daemon


def steady_threads(t: float, d: float) -> float:
    return 1 if t == 0 else 9


def steady_connections(t: float, d: float) -> float:
    return 0 if t == 0 else 2


def three(t: float, d: float) -> float:
    return 3


def samples(
    duration: float,
    every: float,
    *,
    rss_mb: Series = steady_rss,
    threads: Series = steady_threads,
    connections: Series = steady_connections,
    file_fds: Series = three,
    http: Series | None = None,
) -> list[Sample]:
    """One sample every ``every`` seconds from 0 to ``duration``; the daemon's sockets are
    its database connections plus ``http`` (default: ``HTTP`` once it runs)."""
    out = []
    for i in range(int(duration / every) + 1):
        t = i * every
        conns = int(connections(t, duration))
        sockets = conns + int(http(t, duration) if http else (HTTP if t else 0))
        out.append(
            Sample(
                t=t,
                rss_kb=int(rss_mb(t, duration) * 1024),
                threads=int(threads(t, duration)),
                fds=int(file_fds(t, duration)) + sockets,
                connection_fds=sockets,
                connections=conns,
                cpu_seconds=t / 10,
                sync_runs=int(50 * t),
                requests=int(50 * t),
            )
        )
    return out


def judge(s: list[Sample], duration: float) -> list[str]:
    return judge_resources(s, duration, BOUNDS)[1]


# -- what is not a leak --------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_a_steady_daemon_passes(duration: float, every: float) -> None:
    resources, problems = judge_resources(samples(duration, every), duration, BOUNDS)
    assert problems == []
    assert resources["connections"]["bound"] == 2 * WORKERS
    assert resources["threads"]["bound"] == FIXED_THREADS + WORKERS + LAZY_THREADS


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_warm_up_on_a_busy_machine_is_not_a_leak(duration: float, every: float) -> None:
    """Everything a loaded machine does to a healthy daemon, at once: start-up takes the
    first third of the run; the pools fill up late (connections 2 -> 5 -> the pool's size,
    the failure this replaced: "connections grew: 2 -> 5"), the overflow in use up to the
    pool's capacity and for one sample past it (a backend still exiting); every executor
    thread started in the second half; RSS a few MB up after warm-up; a descriptor held
    for a moment now and then."""

    def rss(t: float, d: float) -> float:
        if t < d / 3:  # still importing, then loading every instance's chats
            return 8.0 + 80.0 * t / (d / 3)
        return 90.0 + (5.0 if t > 0.7 * d else 0.0) + (t % 3) * 0.2

    def threads(t: float, d: float) -> float:
        if t < d / 3:
            return 1 if t < d / 6 else 5
        if t < 0.6 * d:
            return 7
        return FIXED_THREADS + WORKERS + LAZY_THREADS  # all of them, late

    def connections(t: float, d: float) -> float:
        if t < d / 3:
            return 0 if t < d / 6 else 2
        if t < 0.6 * d:
            return 5
        if t < 0.9 * d:
            return WORKERS  # the pool keeps what a burst opened
        return 2 * WORKERS  # and the overflow all in use

    def files(t: float, d: float) -> float:
        return 6 if int(t) % 3 == 0 else 3  # one sample in three holds three more

    def http(t: float, d: float) -> float:
        return 0 if t == 0 else WORKERS  # the client's pool, full

    s = samples(
        duration,
        every,
        rss_mb=rss,
        threads=threads,
        connections=connections,
        file_fds=files,
        http=http,
    )
    s[-2].connections = 2 * WORKERS + 1  # a backend still exiting, once
    assert judge(s, duration) == []


def test_a_count_above_its_bound_for_one_sample_is_not_a_leak() -> None:
    s = samples(60.0, 2.0, connections=lambda t, d: 2 * WORKERS)
    for i in (10, 20):  # two separate excursions
        s[i].connections = 2 * WORKERS + 3
    assert judge(s, 60.0) == []
    s[11].connections = 2 * WORKERS + 1  # now two in a row
    assert judge(s, 60.0) == [
        f"{2 * WORKERS + 3} database connections, above the pool's {2 * WORKERS} "
        f"from 20 s on ({SUSTAINED}+ samples in a row)"
    ]


def test_samples_while_the_database_is_down_do_not_break_a_run() -> None:
    s = samples(60.0, 2.0)
    s[10].connections = s[12].connections = 2 * WORKERS + 1
    s[11].connections = None  # an outage: no figure
    assert len(judge(s, 60.0)) == 1


# -- what is a leak ------------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_connections_growing_past_the_pool_are_reported(duration: float, every: float) -> None:
    # one connection more every sample, never returned
    s = samples(duration, every, connections=lambda t, d: 2 + t / every)
    assert any("database connections, above the pool's 16" in p for p in judge(s, duration))


def test_connections_leaked_late_are_reported() -> None:
    # the pool full, then a leak in the last samples of the run (past the second half too)
    s = samples(60.0, 2.0, connections=lambda t, d: 2 * WORKERS + (t > 54))
    assert any("database connections" in p for p in judge(s, 60.0))


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_rss_growing_through_the_second_half_is_reported(duration: float, every: float) -> None:
    # flat through warm-up, then steadily up: twice the bound over the second half
    def rss(t: float, d: float) -> float:
        return steady_rss(t, d) + max(0.0, t - d / 2) * 2 * BOUNDS.rss_growth_mb / (d / 2)

    (problem,) = judge(samples(duration, every, rss_mb=rss), duration)
    assert problem.startswith("RSS grew") and "over the second half" in problem


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_rss_growing_all_run_is_reported(duration: float, every: float) -> None:
    def rss(t: float, d: float) -> float:
        return steady_rss(t, d) + t * 4 * BOUNDS.rss_growth_mb / d

    problems = judge(samples(duration, every, rss_mb=rss), duration)
    assert any(p.startswith("RSS grew") for p in problems)


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_file_descriptors_growing_every_sample_are_reported(duration: float, every: float) -> None:
    (problem,) = judge(samples(duration, every, file_fds=lambda t, d: 3 + t / every), duration)
    assert problem.startswith("file descriptors other than sockets grew")


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_sockets_growing_every_sample_are_reported(duration: float, every: float) -> None:
    # HTTP connections opened and never closed (a session per tick, kept): one per sample
    s = samples(duration, every, http=lambda t, d: HTTP + t / every)
    (problem,) = judge(s, duration)
    assert "sockets and database files, above 24" in problem


@pytest.mark.parametrize(("duration", "every"), SHAPES)
def test_threads_growing_every_sample_are_reported(duration: float, every: float) -> None:
    s = samples(duration, every, threads=lambda t, d: 7 + t / every)
    (problem,) = judge(s, duration)
    assert "threads, above the 14 the daemon's executors allow" in problem


def test_many_short_lived_threads_are_reported() -> None:
    # a thread per request that ends after a while (a threading.Timer per request): a flat
    # count, far above what the executors hold
    s = samples(60.0, 2.0, threads=lambda t, d: 1 if t == 0 else 9 + 40)
    assert any("threads, above" in p for p in judge(s, 60.0))


def test_connections_not_seen_at_all_are_reported() -> None:
    # the daemon's connections not named as the soak counts them: the bound would pass
    # whatever they did
    problems = judge(samples(60.0, 2.0, connections=lambda t, d: 0), 60.0)
    assert any("measured nothing" in p for p in problems)


def test_too_few_samples_after_warm_up_are_reported() -> None:
    problems = judge(samples(60.0, 2.0)[:16], 60.0)  # the daemon gone at 30 s
    assert any("too few" in p for p in problems)


# -- the bounds are the daemon's ------------------------------------------------------------


def test_the_pool_capacity_is_read_from_the_engine_the_daemon_makes() -> None:
    # etl/cli.py: make_engine(url, pool_size=max_workers); no connection is opened
    pg = make_engine("postgresql+psycopg://u@127.0.0.1:1/x", pool_size=WORKERS)
    sqlite = make_engine("sqlite:///unused.db", pool_size=WORKERS)
    try:
        assert pool_capacity(pg) == 2 * WORKERS  # pool_size + max_overflow = pool_size
        assert pool_capacity(sqlite) == 15  # SQLAlchemy's QueuePool defaults, 5 + 10
    finally:
        pg.dispose()
        sqlite.dispose()

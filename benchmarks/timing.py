"""Wall-clock timing shared by the benchmarks: compile first, then time blocking calls."""

import time
from collections.abc import Callable
from typing import Any

import jax


def wall_times(fn: Callable[[], Any], *, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of fn(), after one warm-up (compilation) call.

    Each call waits for its results (`jax.block_until_ready`), so asynchronous dispatch is timed
    to completion.
    """
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], Any], *, repeats: int = 3) -> float:
    """The minimum of `wall_times`: the least disturbed run on a shared machine."""
    return min(wall_times(fn, repeats=repeats))


def interleaved_times(fns: dict[str, Callable[[], Any]], *, rounds: int) -> dict[str, list[float]]:
    """Wall times of each of `fns` (name -> fn) over `rounds` rounds, the calls taken in turn in
    each round (after one warm-up call each), so that the load of a shared machine falls on all
    of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], name: str, floor: str) -> tuple[float, float, float]:
    """(best ratio, least and largest per-round ratio) of `name` over `floor`.

    The best ratio is min(times[name]) / min(times[floor]), each the least disturbed of its
    rounds; the per-round ratios (the two timed in turn in the same round) show the spread.
    """
    per_round = [a / b for a, b in zip(times[name], times[floor], strict=True)]
    return min(times[name]) / min(times[floor]), min(per_round), max(per_round)


def format_ratio(times: dict[str, list[float]], name: str, floor: str) -> str:
    """`ratio` as "1.12 (1.05–1.31 over 5 rounds)"."""
    best, low, high = ratio(times, name, floor)
    return f"{best:.2f} ({low:.2f}–{high:.2f} over {len(times[name])} rounds)"

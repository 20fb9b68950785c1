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

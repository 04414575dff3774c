"""Wall-clock timing for the experiment scripts, written once.

Variants compared are timed interleaved, round by round in one process, so a
shared machine's slow moments fall on all of them alike; each call is timed to
completion (`jax.block_until_ready`) after one warm-up call that compiles it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of `fn`, its results ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, block: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of each zero-argument function: `rounds` rounds after a warm-up call each, a
    round calling each in turn `block` times back to back (a block > 1 lets a small call run warm after a
    big one has flushed the CPU caches)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += [seconds(fn) for _ in range(block)]
    return times


def best_and_median(times: dict[str, list[float]]) -> dict[str, float]:
    """`{name}`: the fastest call (the one least disturbed by other processes); `{name}_median`: the median."""
    return {**{k: min(v) for k, v in times.items()}, **{f"{k}_median": statistics.median(v) for k, v in times.items()}}


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}

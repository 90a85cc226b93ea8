"""Timing on a shared machine: interleaved runs, CPU-utilisation checks, re-timing, summary stats.

Reusable beyond ``copa bench``: ``time_interleaved`` times any set of zero-argument callables.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from copa.utils.device import sync

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Per function: seconds per timed call and the CPU utilisation of each call (process CPU
    seconds / (wall seconds x torch threads); about 1.0 when every thread had its core, lower when
    other processes took cores). ``retried``: calls re-timed for contention; ``waited_s``: time
    spent waiting for a quiet machine."""

    seconds: dict[str, list[float]]
    util: dict[str, list[float]]
    retried: int = 0
    waited_s: float = 0.0


def cpu_util_probe(seconds: float = 0.1) -> float:
    """Share of this process's torch threads that actually ran during a short matmul loop
    (process CPU time / wall / threads): about 1.0 on an idle machine, lower when other processes
    hold cores."""
    a = torch.randn(256, 256)
    threads = max(1, torch.get_num_threads())
    c, t = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t < seconds:
            a @ a
    return (time.process_time() - c) / (time.perf_counter() - t) / threads


def wait_for_quiet(min_util: float, max_wait_s: float = 120.0) -> float:
    """Sleep until ``cpu_util_probe`` reaches ``min_util`` or ``max_wait_s`` passed; returns the wait."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s and cpu_util_probe() < min_util:
        time.sleep(2.0)
    return time.perf_counter() - t0


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    runs: int,
    device: torch.device,
    min_util: float = 0.0,
    max_retries: int = 3,
    max_wait_s: float = 60.0,
) -> Timings:
    """Time every function ``runs`` times after ``warmup`` discarded calls each.

    Round ``i`` times each function once before round ``i+1`` starts (interleaved), so slow drifts
    of the machine hit all functions alike. With ``min_util`` > 0 (CPU), each timed call first
    waits (up to ``max_wait_s``) until a short probe gets ``min_util`` CPU utilisation, and a call
    that itself got less (another process took a core mid-call) is discarded and re-timed, at most
    ``max_retries`` times (then the last one is kept).
    """
    t_start = time.perf_counter()
    for w in range(warmup):
        for fn in fns.values():
            fn()
        log.info("warm-up %d/%d done (%.1f s)", w + 1, warmup, time.perf_counter() - t_start)
    threads = max(1, torch.get_num_threads())
    check = min_util > 0 and device.type == "cpu"
    out = Timings({k: [] for k in fns}, {k: [] for k in fns})
    for i in range(runs):
        if i:
            log.info("timed round %d/%d done (%.1f s)", i, runs, time.perf_counter() - t_start)
        for k, fn in fns.items():
            for attempt in range(max_retries + 1):
                if check:
                    out.waited_s += wait_for_quiet(min_util, max_wait_s)
                sync(device)
                c, t = time.process_time(), time.perf_counter()
                fn()
                sync(device)
                sec = time.perf_counter() - t
                util = (time.process_time() - c) / sec / threads
                if not check or util >= min_util or attempt == max_retries:
                    break
                out.retried += 1
                log.info(
                    "%s re-timed: CPU utilisation %.2f < %.2f (another process took a core)",
                    k,
                    util,
                    min_util,
                )
            out.seconds[k].append(sec)
            out.util[k].append(util)
    return out


def timing_stats(ts: list[float], util: list[float] | None = None) -> dict[str, Any]:
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
    out: dict[str, Any] = {
        "median_ms": 1e3 * statistics.median(ts),
        "min_ms": 1e3 * min(ts),
        "max_ms": 1e3 * max(ts),
        "q1_ms": 1e3 * q[0],
        "q3_ms": 1e3 * q[2],
        "runs_ms": [round(1e3 * t, 2) for t in ts],
    }
    if util:
        out["cpu_util_median"] = statistics.median(util)
    return out

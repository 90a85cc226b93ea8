"""Peak memory of one call: CUDA allocator peaks, CPU tensor peaks from the profiler, process RSS."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _rss_field(name: str) -> float | None:
    """A ``/proc/self/status`` memory field in MiB (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return None


def tensor_bytes(*objs: Any) -> int:
    """Bytes of the parameters and buffers of modules and of plain tensors (each storage once)."""
    seen: set[int] = set()
    total = 0
    for o in objs:
        ts = list(o.parameters()) + list(o.buffers()) if isinstance(o, nn.Module) else [o]
        for t in ts:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def cpu_tensor_peak(fn: Callable[[], Any]) -> int | None:
    """Peak bytes of CPU tensors allocated and still alive during one call of ``fn``, from the
    profiler's allocation records (what ``torch.cuda.max_memory_allocated`` measures on a GPU,
    less what was allocated before the call). None if this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - very old / very new torch
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:  # pragma: no cover
        return None
    allocs: list[tuple[int, int]] = []
    stack = list(roots)
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu":
            allocs.append((e.start_time_ns, int(e.extra_fields.alloc_size)))
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


NO_MEMORY: dict[str, float | None] = {"peak_memory_mb": None, "peak_rss_mb": None}


class PeakMemory:
    """Peak memory of one call, two views.

    - ``peak_memory_mb``: tensors. CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the
      bytes resident before the call (``resident``: weights, buffers, inputs) plus the peak of the
      tensors allocated during it (``cpu_tensor_peak``, profiler allocation records).
    - ``peak_rss_mb`` (CPU): the process RSS high-water ``VmHWM`` of ``/proc/self/status``, reset
      before the call by writing ``5`` to ``/proc/self/clear_refs``; it includes the interpreter,
      libraries and pages the allocator kept from earlier (larger) calls, so it can only overstate.
      Where the reset is impossible it is ``getrusage`` ``ru_maxrss``, the process lifetime peak.
      (``malloc_trim`` before the reset would make it exact but was measured to slow every later
      forward several-fold on this glibc, so it is not used.)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear_refs = device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats (all live tensors)"
        rss = (
            "VmHWM of /proc/self/status reset via /proc/self/clear_refs"
            if self.clear_refs
            else "getrusage ru_maxrss (lifetime peak, not reset)"
        )
        return (
            "peak_memory_mb: weights + buffers + inputs + peak of CPU tensors allocated during the call "
            f"(torch.profiler allocation records); peak_rss_mb: process RSS high-water, {rss}"
        )

    def measure(self, fn: Callable[[], Any], resident: int) -> dict[str, float | None]:
        """Run ``fn`` (CPU: twice, for the RSS and then under the profiler); ``resident`` = bytes
        already allocated before the call (weights, inputs, optimizer state), CPU only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return {"peak_memory_mb": peak, "peak_rss_mb": None}
        if self.clear_refs:  # the RSS run first: the first call after a profiled one is slow
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.clear_refs = False
        fn()
        rss = _rss_field("VmHWM") if self.clear_refs else None
        if rss is None:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        peak = cpu_tensor_peak(fn)
        return {"peak_memory_mb": None if peak is None else (resident + peak) / 2**20, "peak_rss_mb": rss}

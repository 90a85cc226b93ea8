"""The machine a benchmark ran on: CPU/GPU description, the precisions it runs natively, and its
measured dense-matmul peak (the reference for "% of peak")."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from copa.bench.keep import BenchError
from copa.bench.timing import wait_for_quiet
from copa.utils import device as devices
from copa.utils.device import sync

log = logging.getLogger(__name__)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_details() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k in ("cpu family", "model", "stepping", "vendor_id", "cpu MHz"):
            out[k.replace(" ", "_")] = v
        if k == "flags":
            flags = set(v.split())
            isa = ("avx512_bf16", "amx", "avx512f", "avx2", "avx512_vnni")
            out["isa"] = sorted(f for f in flags if f.startswith(isa))
    return out


def hardware_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, torch version (and the GPU when on CUDA)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        **{f"cpu_{k}": v for k, v in _cpu_details().items()},
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": devices.cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def native_precisions(device: torch.device) -> list[torch.dtype]:
    """The precisions this device runs natively: fp32 always, bf16 on a bf16 GPU or a CPU with
    AVX-512 BF16 / AMX. (An AVX2-only CPU emulates bf16 matmuls ~100x slower than fp32.)"""
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = devices.cpu_has_fast_bf16()  # looked up at call time: tests mock it
    return [torch.bfloat16, torch.float32] if fast else [torch.float32]


def bench_precisions(precision: str, device: torch.device) -> list[torch.dtype]:
    """``--precision`` -> the precisions to benchmark: auto / bf16 / fp32 (``resolve_precision``), or
    both (fp32 then bf16)."""
    if precision == "both":
        return [torch.float32, torch.bfloat16]
    try:
        return [devices.resolve_precision(precision, device)]
    except ValueError as e:
        raise BenchError(str(e)) from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def matmul_peak(
    dtype: torch.dtype, device: torch.device, n: int = 4096, runs: int = 3, max_seconds: float | None = None
) -> dict[str, Any]:
    """Measured dense-matmul throughput (n x n @ n x n) in FLOP/s: the best of ``runs`` (+1 warm-up).

    With ``max_seconds``, a 256^3 matmul first estimates the rate, and ``n`` shrinks (to a multiple of
    64, at least 256) so that all ``runs + 1`` calls fit the budget; ``capped`` says it did. On a CPU
    that emulates bf16 the requested 4096^3 would take minutes per call.
    """
    requested = n
    if max_seconds is not None and n > 256:
        a = torch.randn(256, 256, device=device).to(dtype)
        with torch.inference_mode():
            torch.mm(a, a)
            sync(device)
            t = time.perf_counter()
            torch.mm(a, a)
            sync(device)
        per_flop = (time.perf_counter() - t) / (2.0 * 256**3)
        fit = (max_seconds / (runs + 1) / per_flop / 2.0) ** (1.0 / 3.0)
        if fit < n:
            n = max(256, int(fit) // 64 * 64)
    name = dtype_name(dtype)
    log.info(
        "matmul peak %s: %d^3 x %d runs (+1 warm-up)%s",
        name,
        n,
        runs,
        f" (capped from {requested}^3 to fit {max_seconds:g} s)" if n != requested else "",
    )
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i:
                times.append(time.perf_counter() - t)
                log.debug("matmul peak %s: run %d/%d %.2f s", name, i, runs, times[-1])
    flops = 2.0 * n**3
    return {
        "size": n,
        "flops_per_s": flops / min(times),
        "flops_per_s_median": flops / statistics.median(times),
        "capped": n != requested,
    }


EMULATED_PROBE_S = 20.0  # the most a peak probe of an emulated precision may take


def measure_peaks(
    store: dict[str, Any],
    peaks: dict[str, float],
    device: torch.device,
    size: int,
    min_util: float,
    dtypes: list[torch.dtype],
    max_seconds: float | None = None,
) -> None:
    """Measure the matmul peaks of the native precisions and of ``dtypes`` (the ones benchmarked);
    keep the best seen so far in ``store``/``peaks``. A precision the device only emulates (bf16 on
    an AVX2 CPU) is probed only when benchmarked, and always under the ``max_seconds`` cap."""
    if min_util > 0 and device.type == "cpu":
        wait_for_quiet(min_util)
    native = native_precisions(device)
    for dt in (torch.bfloat16, torch.float32):
        if dt not in native and dt not in dtypes:
            continue
        name = dtype_name(dt)
        cap = max_seconds if dt in native else min(max_seconds or EMULATED_PROBE_S, EMULATED_PROBE_S)
        pk = matmul_peak(dt, device, size, max_seconds=cap)
        if dt not in native:
            pk["emulated"] = True
        log.info("matmul peak %s (%d^3): %.3f TFLOP/s", name, pk["size"], pk["flops_per_s"] / 1e12)
        if pk["flops_per_s"] > peaks.get(name, 0.0):
            peaks[name] = pk["flops_per_s"]
            store[name] = pk


def bf16_warning(device: torch.device, dtypes: list[torch.dtype]) -> str | None:
    """The loud warning for bf16 forced on a CPU without native bf16; None when it does not apply."""
    if device.type != "cpu" or torch.bfloat16 not in dtypes or torch.bfloat16 in native_precisions(device):
        return None
    return (
        "bf16 was forced on a CPU without native bf16 (no AVX-512 BF16, no AMX): torch emulates it, "
        "so a bf16 matmul runs ~100x slower than fp32 (measured on an AVX2 EPYC: 0.001 vs 0.12 "
        "TFLOP/s) and every bf16 number here measures that emulation, not the model. Use "
        "--precision fp32 (or auto, which picks fp32 on this CPU)."
    )

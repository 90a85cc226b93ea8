"""``copa bench``: FLOPs and measured throughput of COPA with and without patch selection (SPEC §5).

Protocol (timm / ToMe): eval mode + ``torch.inference_mode``, warm-up runs discarded, a fixed batch,
the median of N timed runs, and the unpruned model measured in the same run with the same weights.
Extra rules for a small shared machine:

- **Interleaved timing.** Run ``i`` of every setting is timed before run ``i+1`` of any, so slow
  drifts of the machine hit all settings alike and the speedups (ratios of medians) stay meaningful.
- **Contention check** (``--min-util``, CPU). Every timed call records its CPU utilisation (process
  CPU time / wall / threads). On 2 cores another busy process halves it and, through OpenMP
  barriers, can slow a forward 3-50x; with ``--min-util 0.9`` each call waits for a quiet machine
  and a call that still got less than 0.9 is re-timed (at most 3 times).
- **Same weights.** One model is built; a keep setting only swaps the (small) selector modules and
  the selection layers/ratios. The unpruned setting has no selector at all (selector ``none``).

What is measured, per keep setting (``none`` = unpruned, ``"6:0.5"``, ``"4:0.7,8:0.5"`` = selection
before blocks 4 and 8 keeping 70 % then 50 % of the patches entering each stage):

- ViT alone: ``model.vision(images, text_cls, ratios)`` -> images/s (text [CLS] precomputed);
- whole model, VQA-style: text encoder + ViT with text-aware selection + fusion (+ one decoder step
  with ``--decode``) -> image-text pairs/s;
- FLOPs of both (``torch.utils.flop_counter``; CPU SDPA counted too, see ``_sdpa_cpu_flops``),
  FLOP ratio, measured speedups, efficiency = measured e2e speedup / FLOP-ratio speedup, achieved
  FLOP/s and its share of a measured matmul peak, peak memory;
- ``--train``: samples/s of a full ``PretrainObjective`` forward + backward + AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from copa.config import Config, SelectConfig

log = logging.getLogger(__name__)

CLS_ID, SEP_ID = 101, 102  # bert-base-uncased WordPiece ids; the text ids are random otherwise


class BenchError(ValueError):
    """A bad benchmark argument (keep setting, batch size, precision)."""


# ------------------------------------------------------------------------------------ keep settings
@dataclass(frozen=True)
class KeepSetting:
    """Where to select and how much to keep. ``layers`` = () means unpruned (selector ``none``)."""

    layers: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()

    @property
    def pruned(self) -> bool:
        return bool(self.layers) and any(r < 1.0 for r in self.ratios)

    @property
    def name(self) -> str:
        if not self.layers:
            return "none"
        return ",".join(f"{layer}:{_fmt_ratio(r)}" for layer, r in zip(self.layers, self.ratios))


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def parse_keep(spec: str, num_layers: int | None = None) -> KeepSetting:
    """Parse one ``--keep`` value.

    ``"none"`` -> unpruned; ``"6:0.5"`` -> select before block 6 (0-based, i.e. after 6 blocks),
    keep 50 %; ``"4:0.7,8:0.5"`` -> two stages, each ratio of the patches entering that stage.
    Layers must increase and lie in ``(0, num_layers)``; ratios in ``(0, 1]``.
    """
    text = spec.strip().lower()
    if text in ("none", "unpruned", "full"):
        return KeepSetting()
    if not text:
        raise BenchError("empty keep setting; use 'none' or LAYER:RATIO[,LAYER:RATIO...] such as '6:0.5'")
    layers: list[int] = []
    ratios: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if part.count(":") != 1:
            raise BenchError(
                f"bad keep setting {spec!r}: {part!r} is not LAYER:RATIO (e.g. '6:0.5' or '4:0.7,8:0.5')"
            )
        a, b = (s.strip() for s in part.split(":"))
        try:
            layer = int(a)
        except ValueError:
            raise BenchError(f"bad keep setting {spec!r}: layer {a!r} is not an integer") from None
        try:
            ratio = float(b)
        except ValueError:
            raise BenchError(f"bad keep setting {spec!r}: ratio {b!r} is not a number") from None
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise BenchError(f"bad keep setting {spec!r}: ratio {b} must be in (0, 1]")
        if layer <= 0 or (num_layers is not None and layer >= num_layers):
            hi = f"{num_layers - 1}" if num_layers is not None else "L-1"
            raise BenchError(
                f"bad keep setting {spec!r}: layer {layer} must be in 1..{hi} (selection before that block)"
            )
        layers.append(layer)
        ratios.append(ratio)
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise BenchError(f"bad keep setting {spec!r}: layers must strictly increase, got {layers}")
    return KeepSetting(tuple(layers), tuple(ratios))


def parse_keeps(specs: list[str], num_layers: int | None = None) -> list[KeepSetting]:
    """Parse every ``--keep`` value; the unpruned setting is always first, duplicates are dropped."""
    out = [KeepSetting()]
    for spec in specs:
        s = parse_keep(spec, num_layers)
        if s.layers and not s.pruned:  # ratio 1.0 everywhere: the unpruned model by construction
            log.warning("keep setting %r prunes nothing; it equals the unpruned model", spec)
        if s not in out:
            out.append(s)
    return out


# ------------------------------------------------------------------------------- selection swapping
class SelectionSwitch:
    """Switches one model between keep settings without touching its ViT/text/fusion weights.

    Each pruned setting gets its own selector modules (one per stage, a fixed seed per setting, the
    ViT's init); ``apply`` swaps them in with the selection layers and ratios. The unpruned setting
    has no selector, exactly the ``selector: none`` model.
    """

    def __init__(self, model: nn.Module, settings: list[KeepSetting], seed: int = 0) -> None:
        from copa.model.selection import make_selector
        from copa.model.vit import _init_weights

        vit = model.vision
        self.model = model
        self.base_select: SelectConfig = vit.select_cfg
        self._saved = (vit.select_cfg, vit.selectors, list(vit.keep_ratios))
        self.selectors: dict[KeepSetting, nn.ModuleList] = {}
        p = next(vit.parameters())
        for i, s in enumerate(settings):
            if not s.layers:
                self.selectors[s] = nn.ModuleList()
                continue
            if s.layers[-1] >= len(vit.blocks):
                raise BenchError(f"keep setting {s.name!r}: the ViT has only {len(vit.blocks)} blocks")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1000 + i)
                mods = [
                    make_selector(self.base_select.selector, vit.cfg.width, model.cfg.text.width, self.base_select.tpd_hidden,
                                  self.base_select.tpd_form)
                    for _ in s.layers
                ]
                mods = [m for m in mods if m is not None]
                for m in mods:
                    m.apply(_init_weights)
            if not mods:
                raise BenchError(
                    f"keep setting {s.name!r} needs a selector, but the config has selector "
                    f"{self.base_select.selector!r}; set model.select.selector=tpd (or text_attn/cls_attn)"
                )
            self.selectors[s] = nn.ModuleList(mods).to(device=p.device, dtype=p.dtype)

    def to(self, dtype: torch.dtype) -> None:
        for mods in self.selectors.values():
            mods.to(dtype=dtype)

    def apply(self, s: KeepSetting) -> None:
        vit = self.model.vision
        if s.layers:
            vit.select_cfg = dataclasses.replace(self.base_select, layers=list(s.layers), keep_ratios=list(s.ratios))
            vit.keep_ratios = list(s.ratios)
        else:
            n = len(self.base_select.layers)
            vit.select_cfg = dataclasses.replace(self.base_select, selector="none", keep_ratios=[1.0] * n)
            vit.keep_ratios = [1.0] * n
        vit.selectors = self.selectors[s]

    def restore(self) -> None:
        """Put the model's own selection config and selectors back."""
        vit = self.model.vision
        vit.select_cfg, vit.selectors, vit.keep_ratios = self._saved[0], self._saved[1], list(self._saved[2])

    def parameters(self) -> Iterator[nn.Parameter]:
        for mods in self.selectors.values():
            yield from mods.parameters()


# ---------------------------------------------------------------------------------------- hardware
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
            out["isa"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx512_vnni")))
    return out


def hardware_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, torch version (and the GPU when on CUDA)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    from copa.utils.device import cpu_has_fast_bf16

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        **{f"cpu_{k}": v for k, v in _cpu_details().items()},
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_precisions(device: torch.device) -> list[torch.dtype]:
    """The precisions this device runs natively: fp32 always, bf16 on a bf16 GPU or a CPU with
    AVX-512 BF16 / AMX. (An AVX2-only CPU emulates bf16 matmuls ~100x slower than fp32.)"""
    from copa.utils import device as dev

    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = dev.cpu_has_fast_bf16()
    return [torch.bfloat16, torch.float32] if fast else [torch.float32]


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
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, a)
            _sync(device)
        per_flop = (time.perf_counter() - t) / (2.0 * 256**3)
        fit = (max_seconds / (runs + 1) / per_flop / 2.0) ** (1.0 / 3.0)
        if fit < n:
            n = max(256, int(fit) // 64 * 64)
    name = _dtype_name(dtype)
    log.info("matmul peak %s: %d^3 x %d runs (+1 warm-up)%s", name, n, runs,
             f" (capped from {requested}^3 to fit {max_seconds:g} s)" if n != requested else "")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t)
                log.debug("matmul peak %s: run %d/%d %.2f s", name, i, runs, times[-1])
    flops = 2.0 * n**3
    return {"size": n, "flops_per_s": flops / min(times), "flops_per_s_median": flops / statistics.median(times),
            "capped": n != requested}


# ------------------------------------------------------------------------------------------ FLOPs
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash SDPA (``aten._scaled_dot_product_flash_attention_for_cpu``), which
    ``torch.utils.flop_counter`` does not count: QK^T and PV, 2 FLOPs per MAC (causal not halved,
    like the counter's CUDA formulas)."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward of the CPU flash SDPA: grad_q, grad_k, grad_v and the score gradient (4 matmuls),
    the counter's convention for the CUDA kernels."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * (2 * d + 2 * dv)


def _custom_flops() -> dict[Any, Callable[..., int]]:
    ops = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        out[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call of ``fn`` (matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------- memory
def _rss_field(name: str) -> float | None:
    """A ``/proc/self/status`` memory field in MiB (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return None


def _tensor_bytes(*objs: Any) -> int:
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


_NO_MEMORY: dict[str, float | None] = {"peak_memory_mb": None, "peak_rss_mb": None}


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
        rss = ("VmHWM of /proc/self/status reset via /proc/self/clear_refs" if self.clear_refs
               else "getrusage ru_maxrss (lifetime peak, not reset)")
        return ("peak_memory_mb: weights + buffers + inputs + peak of CPU tensors allocated during the call "
                f"(torch.profiler allocation records); peak_rss_mb: process RSS high-water, {rss}")

    def measure(self, fn: Callable[[], Any], resident: int) -> dict[str, float | None]:
        """Run ``fn`` (CPU: twice, for the RSS and then under the profiler); ``resident`` = bytes
        already allocated before the call (weights, inputs, optimizer state), CPU only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20, "peak_rss_mb": None}
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


# ----------------------------------------------------------------------------------------- timing
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
                _sync(device)
                c, t = time.process_time(), time.perf_counter()
                fn()
                _sync(device)
                sec = time.perf_counter() - t
                util = (time.process_time() - c) / sec / threads
                if not check or util >= min_util or attempt == max_retries:
                    break
                out.retried += 1
                log.info("%s re-timed: CPU utilisation %.2f < %.2f (another process took a core)", k, util, min_util)
            out.seconds[k].append(sec)
            out.util[k].append(util)
    return out


def _stats(ts: list[float], util: list[float] | None = None) -> dict[str, Any]:
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
    out: dict[str, Any] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                           "max_ms": 1e3 * max(ts), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2],
                           "runs_ms": [round(1e3 * t, 2) for t in ts]}
    if util:
        out["cpu_util_median"] = statistics.median(util)
    return out


# ------------------------------------------------------------------------------------------ model
def build_bench_model(cfg: Config, image_size: int | None, device: torch.device, seed: int = 0) -> nn.Module:
    """The preset's model with random weights (no text checkpoint is loaded) at ``image_size``.

    The ViT is built for the benchmark's image size directly (its position table has that grid), so
    no interpolation runs inside the timed forward.
    """
    from copa.model.copa import COPAModel

    mcfg = dataclasses.replace(cfg.model, vision=dataclasses.replace(cfg.model.vision))
    if image_size:
        if image_size % mcfg.vision.patch_size:
            raise BenchError(f"image size {image_size} is not a multiple of the patch size {mcfg.vision.patch_size}")
        mcfg.vision.image_size = image_size
    torch.manual_seed(seed)
    t = time.perf_counter()
    model = COPAModel(mcfg, load_text_weights=False).to(device).eval()
    log.info("built %s model (%.1f M parameters, %d px) in %.1f s", cfg.name,
             sum(p.numel() for p in model.parameters()) / 1e6, mcfg.vision.image_size, time.perf_counter() - t)
    return model


def make_inputs(model: nn.Module, batch: int, text_len: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Fixed random images (B, 3, H, W) and question tokens ([CLS] w.. [SEP], all attended)."""
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    vocab = model.cfg.text.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID % vocab, SEP_ID % vocab
    return {"images": images.to(device), "ids": ids.to(device), "mask": torch.ones_like(ids).to(device)}


def _precisions(precision: str, device: torch.device) -> list[torch.dtype]:
    from copa.utils.device import resolve_precision

    if precision == "both":
        return [torch.float32, torch.bfloat16]
    try:
        return [resolve_precision(precision, device)]
    except ValueError as e:
        raise BenchError(str(e)) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def _amp(device: torch.device, dtype: torch.dtype, enabled: bool) -> Iterator[None]:
    if enabled and dtype != torch.float32:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------- inference
def _vit_call(model: nn.Module, switch: SelectionSwitch, images: Tensor, query: Tensor, s: KeepSetting) -> Callable[[], Any]:
    """The ViT alone under setting ``s``: images (B, 3, H, W), query (B, Dt) text [CLS]."""

    def f() -> Any:
        switch.apply(s)
        return model.vision(images, query)

    return f


def _e2e_call(
    model: nn.Module, switch: SelectionSwitch, images: Tensor, ids: Tensor, mask: Tensor, decode: bool, s: KeepSetting
) -> Callable[[], Any]:
    """The whole VQA-style forward under setting ``s`` (text encoder, ViT with text-aware selection,
    fusion; with ``decode`` also the decoder's first step from [CLS] and its LM head)."""
    from copa.model.layers import KVCache

    def f() -> Any:
        switch.apply(s)
        fused = model(images, ids, mask)
        if not decode:
            return fused
        ctx, cmask = fused.context()
        h = model.decode(ids[:, :1], None, ctx, cmask, KVCache(len(model.decoder.layers)), 0)
        return model.lm_head(h[:, -1])

    return f


def bench_inference(
    model: nn.Module,
    settings: list[KeepSetting],
    *,
    batch: int = 8,
    text_len: int = 16,
    runs: int = 5,
    warmup: int = 2,
    precisions: list[torch.dtype] | None = None,
    bf16_mode: str = "cast",
    decode: bool = False,
    peaks: dict[str, float] | None = None,
    seed: int = 0,
    min_util: float = 0.0,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Throughput and FLOPs of the ViT alone and of the whole model for every keep setting.

    ``settings[0]`` must be the unpruned setting (``parse_keeps`` puts it there). ``bf16_mode``:
    ``cast`` runs the model with bf16 weights (ToMe / timm ``--model-dtype``), ``autocast`` keeps
    fp32 weights under ``torch.autocast`` (re-casts the weights every forward). ``peaks`` maps a
    precision name to the measured matmul FLOP/s. Returns one record per (precision, setting);
    ``flops`` is per image-text pair, ``flops_vit`` per image. The model comes back in fp32 with its
    own selectors (after a bf16 ``cast`` run its weights are bf16-rounded: fine for timing).
    """
    if not settings or settings[0].layers:
        raise BenchError("the first setting must be the unpruned one ('none')")
    if bf16_mode not in ("cast", "autocast"):
        raise BenchError(f"bf16 mode must be cast or autocast, got {bf16_mode!r}")
    device = next(model.parameters()).device
    precisions = precisions or [torch.float32]
    switch = SelectionSwitch(model, settings, seed)
    inputs = make_inputs(model, batch, text_len, device, seed)
    mem = PeakMemory(device)
    model.eval()
    records: list[dict[str, Any]] = []
    flops: dict[KeepSetting, tuple[int, int]] = {}
    for dtype in precisions:
        pname = _dtype_name(dtype)
        cast = dtype != torch.float32 and bf16_mode == "cast"
        model.to(torch.float32 if not cast else dtype)
        switch.to(torch.float32 if not cast else dtype)
        use_amp = dtype != torch.float32 and not cast
        images = inputs["images"].to(dtype) if cast else inputs["images"]
        ids, mask = inputs["ids"], inputs["mask"]
        with torch.inference_mode(), _amp(device, dtype, use_amp):
            query = model.encode_text(ids, mask)[:, 0]  # the ViT-alone runs take a fixed text [CLS]

            vit_fn = functools.partial(_vit_call, model, switch, images, query)
            e2e_fn = functools.partial(_e2e_call, model, switch, images, ids, mask, decode)

            tokens = {}
            for i, s in enumerate(settings):
                switch.apply(s)
                tokens[s] = int(model.vision(images[:1], query[:1]).tokens.shape[1])
                if s not in flops:  # FLOPs do not depend on the precision
                    log.info("%s: counting FLOPs of setting %s (%d/%d)", pname, s.name, i + 1, len(settings))
                    flops[s] = (count_flops(e2e_fn(s)), count_flops(vit_fn(s)))
            # peak memory of one e2e forward per setting
            if memory:
                log.info("%s: peak memory of %d settings", pname, len(settings))
            resident = _tensor_bytes(model, *switch.selectors.values(), images, ids, mask, query)
            peak_mb = {s: mem.measure(e2e_fn(s), resident) if memory else _NO_MEMORY for s in settings}
            log.info("%s: timing %d settings x %d runs (+%d warm-up), batch %d, interleaved",
                     pname, len(settings), runs, warmup, batch)
            fns: dict[str, Callable[[], Any]] = {}
            for s in settings:
                fns[f"vit|{s.name}"] = vit_fn(s)
                fns[f"e2e|{s.name}"] = e2e_fn(s)
            tm = time_interleaved(fns, warmup, runs, device, min_util)
        times = tm.seconds
        base_vit = statistics.median(times[f"vit|{settings[0].name}"])
        base_e2e = statistics.median(times[f"e2e|{settings[0].name}"])
        base_e2e_min = min(times[f"e2e|{settings[0].name}"])
        f0, fv0 = flops[settings[0]]
        peak = (peaks or {}).get(pname)
        for s in settings:
            tv = statistics.median(times[f"vit|{s.name}"])
            te = statistics.median(times[f"e2e|{s.name}"])
            f, fv = flops[s]
            ratio, ratio_vit = f0 / f, fv0 / fv
            sp_e2e, sp_vit = base_e2e / te, base_vit / tv
            achieved = f / te
            rec = {
                "precision": pname,
                "keep": s.name,
                "layers": list(s.layers),
                "ratios": list(s.ratios),
                "visual_tokens": tokens[s],
                "batch": batch,
                "flops": f // batch,
                "flops_vit": fv // batch,
                "flops_ratio": ratio,
                "flops_ratio_vit": ratio_vit,
                "images_per_s": batch / tv,
                "pairs_per_s": batch / te,
                "speedup_vit": sp_vit,
                "speedup_e2e": sp_e2e,
                "efficiency": sp_e2e / ratio,
                "efficiency_vit": sp_vit / ratio_vit,
                "achieved_flops_per_s": achieved,
                "achieved_flops_per_s_vit": fv / tv,
                "peak_share": achieved / peak if peak else None,
                "peak_share_vit": (fv / tv) / peak if peak else None,
                **peak_mb[s],
                "speedup_e2e_from_min": base_e2e_min / min(times[f"e2e|{s.name}"]),
                "time_e2e": _stats(times[f"e2e|{s.name}"], tm.util[f"e2e|{s.name}"]),
                "time_vit": _stats(times[f"vit|{s.name}"], tm.util[f"vit|{s.name}"]),
                "retried_calls": tm.retried,
                "waited_s": round(tm.waited_s, 1),
            }
            records.append(rec)
    switch.restore()
    model.to(torch.float32)
    return records


# ----------------------------------------------------------------------------------------- training
def synthetic_batch(model: nn.Module, batch: int, text_len: int, seed: int = 0, boxed: int = 1, phrases: int = 2) -> Any:
    """A fixed pre-training ``Batch``: random images and captions, ``boxed`` samples carrying
    ``phrases`` phrase boxes each (PTA runs), every image distinct (hard negatives exist)."""
    from copa.data.collate import Batch

    if batch < 2:
        raise BenchError("the training step needs a batch of at least 2 (ITM samples hard negatives)")
    g = torch.Generator().manual_seed(seed)
    size, n = model.cfg.vision.image_size, model.vision.num_patches
    vocab = model.cfg.text.vocab_size
    lo = min(1000, vocab - 1)

    def texts(rows: int, length: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(lo, vocab, (rows, length), generator=g)
        ids[:, 0], ids[:, -1] = CLS_ID % vocab, SEP_ID % vocab
        return ids, torch.ones_like(ids)

    boxed = min(boxed, batch)
    cap_ids, cap_mask = texts(batch, text_len)
    p = boxed * phrases
    ph_ids, ph_mask = texts(p, max(4, text_len // 3))
    labels = (torch.rand(p, n, generator=g) < 0.15).float()
    has_boxes = torch.zeros(batch, dtype=torch.bool)
    has_boxes[:boxed] = True
    phrase_image = torch.arange(boxed).repeat_interleave(phrases)
    union = torch.zeros(batch, n)
    for i in range(p):
        union[phrase_image[i]] = torch.maximum(union[phrase_image[i]], labels[i])
    return Batch(
        images=torch.randn(batch, 3, size, size, generator=g), image_ids=torch.arange(batch),
        caption_ids=cap_ids, caption_mask=cap_mask, captions=[""] * batch, has_boxes=has_boxes,
        phrase_ids=ph_ids, phrase_mask=ph_mask, phrase_image=phrase_image, phrase_labels=labels,
        phrases=[""] * p, union_labels=union,
    )


def _batch_tensors(batch: Any) -> list[Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, Tensor)]


def _opt_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)]


def bench_train(
    model: nn.Module,
    cfg: Config,
    settings: list[KeepSetting],
    *,
    batch: int = 4,
    text_len: int = 16,
    runs: int = 3,
    warmup: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    min_util: float = 0.0,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Samples/s of one pre-training step (``PretrainObjective`` forward + backward + grad clipping
    + AdamW), unpruned (selector ``none``) vs each pruned setting; same weights, same batch, bf16
    autocast over fp32 weights as in ``copa pretrain``. Steps are interleaved across settings.
    The weights drift with the steps (speed does not depend on their values)."""
    from copa.train.losses import PretrainObjective
    from copa.train.trainer import param_groups

    if not settings or settings[0].layers:
        raise BenchError("the first setting must be the unpruned one ('none')")
    device = next(model.parameters()).device
    model.to(torch.float32).train()
    switch = SelectionSwitch(model, settings, seed)
    t = cfg.train
    objective = PretrainObjective(model, t.loss_weights, t.mlm_prob, t.pta_pos_weight)
    data = synthetic_batch(model, batch, text_len, seed).to(device)
    switch.apply(settings[0])
    groups = param_groups(model, t)
    extra = [q for q in switch.parameters()]
    if extra:
        groups.append({"params": extra, "lr": t.lr, "weight_decay": t.weight_decay})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    mem = PeakMemory(device)
    amp = dtype != torch.float32

    def step_fn(s: KeepSetting) -> Callable[[], None]:
        def f() -> None:
            switch.apply(s)
            with _amp(device, dtype, amp):
                res = objective(data)
            res.loss.backward()
            if t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return f

    # FLOPs of forward + backward (the optimizer step is not a matmul); this first step per setting
    # also allocates the AdamW state, which then counts as resident in the memory pass
    log.info("train: counting FLOPs of %d settings", len(settings))
    flops = {s: count_flops(step_fn(s)) for s in settings}
    peak_mb = {s: _NO_MEMORY for s in settings}
    for s in settings if memory else []:
        resident = _tensor_bytes(model, *switch.selectors.values(), *_batch_tensors(data), *_opt_tensors(opt))
        peak_mb[s] = mem.measure(step_fn(s), resident)
    log.info("train: timing %d settings x %d steps (+%d warm-up), batch %d, interleaved",
             len(settings), runs, warmup, batch)
    tm = time_interleaved({s.name: step_fn(s) for s in settings}, warmup, runs, device, min_util)
    times = tm.seconds
    switch.restore()
    opt.zero_grad(set_to_none=True)
    model.eval()
    t0 = statistics.median(times[settings[0].name])
    f0 = flops[settings[0]]
    out = []
    for s in settings:
        ts = statistics.median(times[s.name])
        sp, ratio = t0 / ts, f0 / flops[s]
        out.append({
            "precision": _dtype_name(dtype) + ("-autocast" if amp else ""),
            "keep": s.name, "layers": list(s.layers), "ratios": list(s.ratios), "batch": batch,
            "flops": flops[s] // batch, "flops_ratio": ratio, "samples_per_s": batch / ts,
            "speedup": sp, "efficiency": sp / ratio, "achieved_flops_per_s": flops[s] / ts,
            **peak_mb[s],
            "time_step": _stats(times[s.name], tm.util[s.name]), "retried_calls": tm.retried,
            "waited_s": round(tm.waited_s, 1),
        })
    return out


# ------------------------------------------------------------------------------------------ output
def _g(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of inference records."""
    head = ("| prec | keep | vis. tokens | GFLOPs/pair | GFLOPs ViT/img | FLOP ratio | img/s (ViT) | pairs/s "
            "| speedup ViT | speedup e2e | efficiency | TFLOP/s | % matmul peak | peak MB | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        share = f"{100 * r['peak_share']:.0f}" if r.get("peak_share") else "-"
        lines.append(
            f"| {r['precision']} | {r['keep']} | {r['visual_tokens']} | {_g(r['flops'])} | {_g(r['flops_vit'])} "
            f"| {r['flops_ratio']:.2f}x | {r['images_per_s']:.2f} | {r['pairs_per_s']:.2f} "
            f"| {r['speedup_vit']:.2f}x | {r['speedup_e2e']:.2f}x | {r['efficiency']:.2f} "
            f"| {r['achieved_flops_per_s'] / 1e12:.3f} | {share} | {_mb(r['peak_memory_mb'])} | {_mb(r['peak_rss_mb'])} |"
        )
    return "\n".join(lines)


def format_train_table(records: list[dict[str, Any]]) -> str:
    head = "| prec | keep | GFLOPs/sample (fwd+bwd) | FLOP ratio | samples/s | step ms | speedup | efficiency | peak MB | peak RSS MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        lines.append(
            f"| {r['precision']} | {r['keep']} | {_g(r['flops'])} | {r['flops_ratio']:.2f}x | {r['samples_per_s']:.3f} "
            f"| {r['time_step']['median_ms']:.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {_mb(r['peak_memory_mb'])} "
            f"| {_mb(r['peak_rss_mb'])} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser(
        "bench", help="FLOPs and measured throughput, pruned vs unpruned (ViT images/s, model pairs/s, training)",
        description="Benchmark COPA with and without text-aware patch selection (SPEC §5). The unpruned "
        "model is always measured in the same run with the same weights; timings are interleaved.",
    )
    add_common(p, out_default="runs/bench")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the config's)")
    p.add_argument("--batch", type=int, default=8, help="images / image-text pairs per forward (default 8)")
    p.add_argument("--keep", action="append", default=[], metavar="L:R[,L:R]",
                   help="keep setting: 'none', '6:0.5' (select before block 6, keep 50%%) or '4:0.7,8:0.5'; "
                   "repeatable; default: the config's select.layers/keep_ratios. 'none' is always added")
    p.add_argument("--runs", type=int, default=5, help="timed runs per setting (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up runs per setting")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "both"],
                   help="auto: bf16 on GPU / CPUs with fast bf16, else fp32; both: fp32 then bf16")
    p.add_argument("--bf16-mode", default="cast", choices=["cast", "autocast"],
                   help="inference in bf16: cast the weights (default, as ToMe/timm --model-dtype) or autocast")
    p.add_argument("--text-len", type=int, default=16, help="question tokens incl. [CLS]/[SEP] (default 16)")
    p.add_argument("--decode", action="store_true", help="add one decoder step (the first answer token) to e2e")
    p.add_argument("--train", action="store_true", help="also benchmark a pre-training step")
    p.add_argument("--train-only", action="store_true", help="only the pre-training step benchmark")
    p.add_argument("--train-batch", type=int, default=4, help="samples per training step (default 4)")
    p.add_argument("--train-runs", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=1)
    p.add_argument("--min-util", type=float, default=0.0,
                   help="CPU, for shared machines: before each timed call wait (up to 1 min) until a probe gets "
                   "this CPU utilisation (process CPU time / wall / threads), and re-time a call (up to 3 "
                   "times) that got less, i.e. another process took a core; 0 = off (default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes (faster)")
    p.add_argument("--peak-size", type=int, default=4096, help="matmul size for the peak FLOP/s probe (0: skip)")
    p.add_argument("--peak-max-s", type=float, default=30.0,
                   help="time cap per precision of the peak probe: the matmul shrinks to fit (0: no cap). "
                   f"Precisions the CPU only emulates (bf16 without AVX-512 BF16/AMX) are probed only when "
                   f"benchmarked, capped at {EMULATED_PROBE_S:g} s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench.json", help="JSON file name inside --out")
    p.set_defaults(func=run)


def _measure_peaks(
    store: dict[str, Any], peaks: dict[str, float], device: torch.device, size: int, min_util: float,
    dtypes: list[torch.dtype], max_seconds: float | None = None,
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
        name = _dtype_name(dt)
        cap = max_seconds if dt in native else min(max_seconds or EMULATED_PROBE_S, EMULATED_PROBE_S)
        pk = matmul_peak(dt, device, size, max_seconds=cap)
        if dt not in native:
            pk["emulated"] = True
        log.info("matmul peak %s (%d^3): %.3f TFLOP/s", name, pk["size"], pk["flops_per_s"] / 1e12)
        if pk["flops_per_s"] > peaks.get(name, 0.0):
            peaks[name] = pk["flops_per_s"]
            store[name] = pk


EMULATED_PROBE_S = 20.0  # the most a peak probe of an emulated precision may take


def bf16_warning(device: torch.device, dtypes: list[torch.dtype]) -> str | None:
    """The loud warning for bf16 forced on a CPU without native bf16; None when it does not apply."""
    if device.type != "cpu" or torch.bfloat16 not in dtypes or torch.bfloat16 in native_precisions(device):
        return None
    return ("bf16 was forced on a CPU without native bf16 (no AVX-512 BF16, no AMX): torch emulates it, "
            "so a bf16 matmul runs ~100x slower than fp32 (measured on an AVX2 EPYC: 0.001 vs 0.12 "
            "TFLOP/s) and every bf16 number here measures that emulation, not the model. Use "
            "--precision fp32 (or auto, which picks fp32 on this CPU).")


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        return _run(args, cfg)
    except BenchError as e:
        log.error("%s", e)
        return 2


def _run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.utils.device import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    for name in ("batch", "runs", "train_batch", "train_runs", "text_len"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if args.text_len < 2:
        raise BenchError("--text-len must be >= 2 ([CLS] and [SEP])")
    specs = args.keep or [",".join(f"{a}:{b:g}" for a, b in zip(cfg.model.select.layers, cfg.model.select.keep_ratios))]
    settings = parse_keeps(specs, cfg.model.vision.layers)
    dtypes = _precisions(args.precision, device)
    warnings: list[str] = []
    warning = bf16_warning(device, dtypes)
    if warning:
        warnings.append(warning)
        log.warning("%s\n%s\n%s", "!" * 100, warning, "!" * 100)
    hw = hardware_info(device)
    log.info("hardware: %s, %s cores (%s usable), %d torch threads, torch %s%s", hw["cpu"], hw["cpu_cores"],
             hw["cpu_cores_usable"], hw["torch_threads"], hw["torch"], f", GPU {hw['gpu']}" if "gpu" in hw else "")
    result: dict[str, Any] = {
        "command": " ".join(["copa", *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hardware": hw,
        "config": args.config,
        "overrides": args.overrides,
        "preset": cfg.name,
        "image_size": args.image_size or cfg.model.vision.image_size,
        "batch": args.batch,
        "text_len": args.text_len,
        "runs": args.runs,
        "warmup": args.warmup,
        "bf16_mode": args.bf16_mode,
        "decode_step": args.decode,
        "timing": "median of runs, settings interleaved run by run",
        "min_util": args.min_util,
        "selector": cfg.model.select.selector,
        "warnings": warnings,
    }
    peaks: dict[str, float] = {}
    peak_cap = args.peak_max_s if args.peak_max_s > 0 else None
    if args.peak_size > 0:
        result["matmul_peak"] = {}
        _measure_peaks(result["matmul_peak"], peaks, device, args.peak_size, args.min_util, dtypes, peak_cap)
    model = build_bench_model(cfg, args.image_size, device, args.seed)
    result["patches"] = model.vision.num_patches
    result["parameters"] = model.num_parameters()
    mem = PeakMemory(device)
    result["memory_method"] = mem.method
    out_dir = Path(args.out or "runs/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / args.json
    if not args.train_only:
        records = bench_inference(
            model, settings, batch=args.batch, text_len=args.text_len, runs=args.runs, warmup=args.warmup,
            precisions=dtypes, bf16_mode=args.bf16_mode, decode=args.decode, peaks=peaks, seed=args.seed,
            min_util=args.min_util, memory=not args.no_memory,
        )
        result["results"] = records
        path.write_text(json.dumps(result, indent=2))  # keep the inference numbers if training fails
    if args.peak_size > 0:  # again at the end: the better of both, and the shares follow it
        _measure_peaks(result["matmul_peak"], peaks, device, args.peak_size, args.min_util, dtypes, peak_cap)
        for r in result.get("results", []):
            pk = peaks.get(r["precision"])
            r["peak_share"] = r["achieved_flops_per_s"] / pk if pk else None
            r["peak_share_vit"] = r["achieved_flops_per_s_vit"] / pk if pk else None
    if args.train or args.train_only:
        tdtype = dtypes[-1]
        result["train"] = bench_train(
            model, cfg, settings, batch=args.train_batch, text_len=args.text_len, runs=args.train_runs,
            warmup=args.train_warmup, dtype=tdtype, seed=args.seed, min_util=args.min_util,
            memory=not args.no_memory,
        )
        result["train_setup"] = {"batch": args.train_batch, "runs": args.train_runs, "warmup": args.train_warmup,
                                 "precision": _dtype_name(tdtype), "step": "PretrainObjective fwd+bwd+clip+AdamW"}
    hw["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    path.write_text(json.dumps(result, indent=2))
    batch_txt = f"train batch {args.train_batch}" if args.train_only else f"batch {args.batch}"
    header = (f"{cfg.name} @ {result['image_size']} px, {batch_txt}, {hw['cpu']} "
              f"({hw['cpu_cores_usable']} cores, {hw['torch_threads']} threads), torch {hw['torch']}"
              + (f", GPU {hw['gpu']}" if "gpu" in hw else ""))
    print(header)
    for w in warnings:
        print(f"WARNING: {w}")
    if peaks:
        print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    if "results" in result:
        print(format_table(result["results"]))
    if "train" in result:
        print(f"\ntraining step (batch {args.train_batch}):")
        print(format_train_table(result["train"]))
    print(f"\nJSON: {path}")
    return 0

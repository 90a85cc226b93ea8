"""``copa bench``: the command line, and the run that ties hardware, runners and tables together."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from copa.bench.hardware import (
    EMULATED_PROBE_S,
    bench_precisions,
    bf16_warning,
    dtype_name,
    hardware_info,
    measure_peaks,
)
from copa.bench.harness import COMPILE_MODES, build_bench_model
from copa.bench.inference import bench_inference
from copa.bench.keep import BenchError, parse_keeps
from copa.bench.memory import PeakMemory
from copa.bench.retrieval import add_args as add_retrieval_args
from copa.bench.retrieval import run_retrieval
from copa.bench.tables import format_table, format_train_table
from copa.bench.train import bench_train
from copa.config import Config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser(
        "bench",
        help="FLOPs and measured throughput, pruned vs unpruned (ViT images/s, model pairs/s, training)",
        description="Benchmark COPA with and without text-aware patch selection (SPEC §5). The unpruned "
        "model is always measured in the same run with the same weights; timings are interleaved.",
    )
    p.add_argument(
        "mode",
        nargs="?",
        default="model",
        choices=["model", "retrieval"],
        help="model (default): FLOPs and speed of the model per keep setting on random inputs; retrieval: "
        "the two-stage retrieval on a gallery (ITC, ITM re-rank with / without prefix reuse, pruned / "
        "unpruned, R@1; --ckpt, --data)",
    )
    add_common(p, out_default="runs/bench")
    p.add_argument(
        "--image-size", type=int, default=None, help="image side in pixels (default: the config's)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images / image-text pairs per forward (default 8; retrieval: eval.batch_size)",
    )
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="[SEL@]L:R[,L:R]",
        help="keep setting: 'none', '6:0.5' (select before block 6, keep 50%%) or '4:0.7,8:0.5'; "
        "a SELECTOR@ prefix ('tome@6:0.5', 'random@6:0.5') uses another selector than the "
        "config's, on the same weights; repeatable; default: the config's select.layers/"
        "keep_ratios. 'none' is always added",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per setting, median reported (default 5; retrieval 1)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="discarded warm-up runs per setting (default 2; retrieval: 1 pass of one batch per path)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32", "both"],
        help="auto: bf16 on GPU / CPUs with fast bf16, else fp32; both: fp32 then bf16",
    )
    p.add_argument(
        "--bf16-mode",
        default="cast",
        choices=["cast", "autocast"],
        help="inference in bf16: cast the weights (default, as ToMe/timm --model-dtype) or autocast",
    )
    p.add_argument("--text-len", type=int, default=16, help="question tokens incl. [CLS]/[SEP] (default 16)")
    p.add_argument(
        "--decode", action="store_true", help="add one decoder step (the first answer token) to e2e"
    )
    p.add_argument("--train", action="store_true", help="also benchmark a pre-training step")
    p.add_argument("--train-only", action="store_true", help="only the pre-training step benchmark")
    p.add_argument("--train-batch", type=int, default=4, help="samples per training step (default 4)")
    p.add_argument("--train-runs", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=1)
    p.add_argument(
        "--min-util",
        type=float,
        default=0.0,
        help="CPU, for shared machines: before each timed call wait (up to 1 min) until a probe "
        "gets this CPU utilisation (process CPU time / wall / threads), and re-time a call (up "
        "to 3 times) that got less, i.e. another process took a core; 0 = off (default)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes (faster)")
    p.add_argument(
        "--peak-size", type=int, default=4096, help="matmul size for the peak FLOP/s probe (0: skip)"
    )
    p.add_argument(
        "--peak-max-s",
        type=float,
        default=30.0,
        help="time cap per precision of the peak probe: the matmul shrinks to fit (0: no cap). "
        f"Precisions the CPU only emulates (bf16 without AVX-512 BF16/AMX) are probed only when "
        f"benchmarked, capped at {EMULATED_PROBE_S:g} s",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=list(COMPILE_MODES),
        help="time the model with its blocks under torch.compile (inductor; MODE default: 'default'); "
        "the warm-up runs compile, FLOPs and memory are counted eagerly",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", default=None, help="JSON file name inside --out (default bench.json; retrieval_bench.json)"
    )
    add_retrieval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        if args.mode == "retrieval":
            return run_retrieval(args, cfg)
        return _run(args, cfg)
    except BenchError as e:
        log.error("%s", e)
        return 2


def _run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.utils.device import default_device

    args.batch = 8 if args.batch is None else args.batch
    args.runs = 5 if args.runs is None else args.runs
    args.warmup = 2 if args.warmup is None else args.warmup
    args.json = args.json or "bench.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    for name in ("batch", "runs", "train_batch", "train_runs", "text_len"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if args.text_len < 2:
        raise BenchError("--text-len must be >= 2 ([CLS] and [SEP])")
    sel = cfg.model.select
    specs = args.keep or [",".join(f"{a}:{b:g}" for a, b in zip(sel.layers, sel.keep_ratios, strict=True))]
    settings = parse_keeps(specs, cfg.model.vision.layers)
    dtypes = bench_precisions(args.precision, device)
    warnings: list[str] = []
    warning = bf16_warning(device, dtypes)
    if warning:
        warnings.append(warning)
        log.warning("%s\n%s\n%s", "!" * 100, warning, "!" * 100)
    hw = hardware_info(device)
    log.info(
        "hardware: %s, %s cores (%s usable), %d torch threads, torch %s%s",
        hw["cpu"],
        hw["cpu_cores"],
        hw["cpu_cores_usable"],
        hw["torch_threads"],
        hw["torch"],
        f", GPU {hw['gpu']}" if "gpu" in hw else "",
    )
    result: dict[str, Any] = {
        "command": shlex.join(["copa", *getattr(args, "argv", sys.argv[1:])]),
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
        "compile": args.compile or "off",
        "warnings": warnings,
    }
    peaks: dict[str, float] = {}
    peak_cap = args.peak_max_s if args.peak_max_s > 0 else None
    if args.peak_size > 0:
        result["matmul_peak"] = {}
        measure_peaks(result["matmul_peak"], peaks, device, args.peak_size, args.min_util, dtypes, peak_cap)
    model = build_bench_model(cfg, args.image_size, device, args.seed)
    result["patches"] = model.num_patches
    result["parameters"] = model.num_parameters()
    mem = PeakMemory(device)
    result["memory_method"] = mem.method
    out_dir = Path(args.out or "runs/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / args.json
    if not args.train_only:
        records = bench_inference(
            model,
            settings,
            batch=args.batch,
            text_len=args.text_len,
            runs=args.runs,
            warmup=args.warmup,
            precisions=dtypes,
            bf16_mode=args.bf16_mode,
            decode=args.decode,
            peaks=peaks,
            seed=args.seed,
            min_util=args.min_util,
            memory=not args.no_memory,
            compile_mode=args.compile,
        )
        result["results"] = records
        path.write_text(json.dumps(result, indent=2))  # keep the inference numbers if training fails
    if args.peak_size > 0:  # again at the end: the better of both, and the shares follow it
        measure_peaks(result["matmul_peak"], peaks, device, args.peak_size, args.min_util, dtypes, peak_cap)
        for r in result.get("results", []):
            pk = peaks.get(r["precision"])
            r["peak_share"] = r["achieved_flops_per_s"] / pk if pk else None
            r["peak_share_vit"] = r["achieved_flops_per_s_vit"] / pk if pk else None
    if args.train or args.train_only:
        tdtype = dtypes[-1]
        result["train"] = bench_train(
            model,
            cfg,
            settings,
            batch=args.train_batch,
            text_len=args.text_len,
            runs=args.train_runs,
            warmup=args.train_warmup,
            dtype=tdtype,
            seed=args.seed,
            min_util=args.min_util,
            memory=not args.no_memory,
            compile_mode=args.compile,
        )
        result["train_setup"] = {
            "batch": args.train_batch,
            "runs": args.train_runs,
            "warmup": args.train_warmup,
            "precision": dtype_name(tdtype),
            "step": "PretrainObjective fwd+bwd+clip+AdamW",
        }
    hw["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    path.write_text(json.dumps(result, indent=2))
    batch_txt = f"train batch {args.train_batch}" if args.train_only else f"batch {args.batch}"
    header = (
        f"{cfg.name} @ {result['image_size']} px, {batch_txt}, {hw['cpu']} "
        f"({hw['cpu_cores_usable']} cores, {hw['torch_threads']} threads), torch {hw['torch']}"
        + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
        + (f", torch.compile ({args.compile})" if args.compile else "")
    )
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

"""Where the time of one pruned forward goes: ViT blocks, selector, gather/fuse, text encoder,
fusion (torch.profiler with labelled regions, bf16 autocast on the CPU, random weights).

    python scripts/profile_pruned.py --config configs/base.yaml --image-size 384 --keep 3:0.5,6:0.5
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from copa.bench.harness import build_bench_model
from copa.config import load_config
from copa.model import vit


def label(module: nn.Module, name: str) -> None:
    forward = module.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return forward(*args, **kwargs)

    module.forward = wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--keep", default="3:0.5,6:0.5", help="layer:ratio,... as in copa bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=20)
    args = ap.parse_args()
    pairs = [s.split(":") for s in args.keep.split(",")]
    cfg = load_config(
        args.config,
        [
            f"model.select.layers=[{','.join(p[0] for p in pairs)}]",
            f"model.select.keep_ratios=[{','.join(p[1] for p in pairs)}]",
        ],
    )
    model = build_bench_model(cfg, args.image_size, torch.device("cpu")).eval()
    original = vit.select_and_fuse

    def select_and_fuse(*a: Any, **k: Any) -> Any:
        with record_function("gather + fuse"):
            return original(*a, **k)

    vit.select_and_fuse = select_and_fuse
    for sel in model.vision.selectors:
        label(sel, "selector")
    for block in model.vision.blocks:
        label(block, "ViT blocks")
    label(model.text, "text encoder")
    label(model.fusion, "fusion")
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    ids = torch.randint(1000, 2000, (args.batch, args.text_len))
    mask = torch.ones_like(ids)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for _ in range(2):
            model(images, ids, mask)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(images, ids, mask)
            total = time.perf_counter() - t0
    names = {"ViT blocks", "selector", "gather + fuse", "text encoder", "fusion"}
    rows = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in names}
    print(f"{args.config} @ {args.image_size}px, keep {args.keep}, batch {args.batch}: {total * 1e3:.0f} ms")
    for name, ms in sorted(rows.items(), key=lambda r: -r[1]):
        print(f"  {name:14s} {ms:8.1f} ms  {100 * ms / (total * 1e3):5.1f}%")


if __name__ == "__main__":
    main()

"""Where a pre-training step loses time when pruned: forward, backward, grad clipping and the AdamW
step timed apart, unpruned vs one keep setting (interleaved, medians), each phase's FLOP ratio beside
its speedup, and with ``--profile`` the ops whose time shrinks least (torch.profiler, self CPU time).

    python scripts/profile_train_step.py --config configs/base.yaml --image-size 256 --batch 2 \\
        --keep 3:0.5,6:0.5 --runs 3 --profile
    python scripts/profile_train_step.py ... --fused-adamw     # the optimizer as one fused kernel

Random weights and a synthetic batch (``copa.bench.train.synthetic_batch``), the same step as
``copa bench --train``: ``PretrainObjective`` forward + backward + clipping + AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from copa.bench.flops import count_flops
from copa.bench.harness import build_bench_model, prepare
from copa.bench.keep import parse_keeps
from copa.bench.train import synthetic_batch
from copa.config import load_config
from copa.train.losses import PretrainObjective
from copa.train.optim import param_groups
from copa.utils.device import autocast

PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--keep", default="3:0.5,6:0.5")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True)")
    ap.add_argument("--profile", action="store_true", help="one more step per setting under torch.profiler")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--min-util",
        type=float,
        default=0.8,
        help="re-time a step (up to 3 times) whose CPU utilisation (CPU time / wall / threads) "
        "was below this: another process took a core (shared machines)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cpu")
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    model = build_bench_model(cfg, args.image_size, device)
    settings = parse_keeps([args.keep], cfg.model.vision.layers)
    h = prepare(model, settings)
    model.to(torch.float32).train()
    t = cfg.train
    objective = PretrainObjective(model, t.loss_weights, t.mlm_prob, t.pta_pos_weight)
    data = synthetic_batch(model, args.batch, args.text_len).to(device)
    h.switch.apply(settings[0])
    groups = param_groups(model, t)
    extra = list(h.switch.parameters())
    if extra:
        groups.append({"params": extra, "lr": t.lr, "weight_decay": t.weight_decay})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), **({"fused": True} if args.fused_adamw else {}))

    def step(s) -> dict[str, float]:
        for _ in range(4):
            c, w = time.process_time(), time.perf_counter()
            out = one_step(s)
            util = (time.process_time() - c) / (time.perf_counter() - w) / threads
            if util >= args.min_util:
                break
            retimed.append(util)
        return out

    def one_step(s) -> dict[str, float]:
        h.switch.apply(s)
        marks = [time.perf_counter()]
        with autocast(device, dtype):
            res = objective(data)
        marks.append(time.perf_counter())
        res.loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return {p: marks[i + 1] - marks[i] for i, p in enumerate(PHASES)}

    def forward_only(s) -> None:
        h.switch.apply(s)
        with autocast(device, dtype):
            objective(data)

    def forward_backward(s) -> None:
        h.switch.apply(s)
        with autocast(device, dtype):
            res = objective(data)
        res.loss.backward()
        opt.zero_grad(set_to_none=True)

    retimed: list[float] = []
    flops = {}
    for s in settings:
        fwd = count_flops(lambda s=s: forward_only(s))
        both = count_flops(lambda s=s: forward_backward(s))
        flops[s] = {"forward": fwd, "backward": both - fwd}
    for s in settings:  # warm-up (also allocates the AdamW state)
        step(s)
    times: dict = {s: defaultdict(list) for s in settings}
    for _ in range(args.runs):
        for s in settings:
            for p, sec in step(s).items():
                times[s][p].append(sec)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adamw = "fused" if args.fused_adamw else "default"
    print(
        f"{cfg.name} @ {args.image_size} px, batch {args.batch}, {args.precision}, {threads} threads, "
        f"{n_params / 1e6:.1f} M trained parameters, AdamW {adamw}, median of {args.runs} interleaved "
        f"steps, {len(retimed)} steps re-timed for CPU utilisation < {args.min_util}"
    )
    base, pruned = settings[0], settings[-1]
    med = {s: {p: statistics.median(times[s][p]) for p in PHASES} for s in settings}
    print(f"| phase | {base.name} ms | {pruned.name} ms | speedup | FLOP ratio | share of unpruned step |")
    print("|---|---|---|---|---|---|")
    total0, total1 = sum(med[base].values()), sum(med[pruned].values())
    for p in PHASES:
        a, b = med[base][p], med[pruned][p]
        fr = f"{flops[base][p] / flops[pruned][p]:.2f}x" if p in flops[base] and flops[pruned][p] else "-"
        print(f"| {p} | {a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.2f}x | {fr} | {100 * a / total0:.0f}% |")
    f0 = flops[base]["forward"] + flops[base]["backward"]
    f1 = flops[pruned]["forward"] + flops[pruned]["backward"]
    sp = total0 / total1
    print(
        f"| step | {total0 * 1e3:.0f} | {total1 * 1e3:.0f} | {sp:.2f}x | {f0 / f1:.2f}x "
        f"| efficiency {sp / (f0 / f1):.2f} |"
    )
    fb0 = med[base]["forward"] + med[base]["backward"]
    fb1 = med[pruned]["forward"] + med[pruned]["backward"]
    print(
        f"forward + backward alone: {fb0 / fb1:.2f}x for {f0 / f1:.2f}x FLOPs "
        f"(efficiency {(fb0 / fb1) / (f0 / f1):.2f})"
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        self_ms = {}
        for s in settings:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one_step(s)
            self_ms[s] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        keys = set(self_ms[base]) | set(self_ms[pruned])
        rows = sorted(keys, key=lambda k: -self_ms[base].get(k, 0.0))[: args.top]
        print(f"\ntop {args.top} ops by self CPU time in the unpruned step (one profiled step each):")
        print(f"| op | {base.name} ms | {pruned.name} ms | ratio |")
        print("|---|---|---|---|")
        for k in rows:
            a, b = self_ms[base].get(k, 0.0), self_ms[pruned].get(k, 0.0)
            print(f"| {k} | {a:.0f} | {b:.0f} | {a / b if b else float('inf'):.2f}x |")


if __name__ == "__main__":
    main()

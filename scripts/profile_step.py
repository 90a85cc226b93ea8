"""Where the time of one pre-training step goes (forward + backward + optimizer), per objective and
per module, on real batches of the embedded synthetic scenes. fp32 by default: the AVX2-only CPU
(no bf16) is the slowest machine our users have, so the demo is sized for it.

    python scripts/profile_step.py --data runs/demo/data --batch 32 --steps 3
    python scripts/profile_step.py --data runs/demo/data --set model.vision.image_size=96
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from copa.config import load_config
from copa.model.copa import COPAModel
from copa.train.losses import LOSS_NAMES, PretrainObjective
from copa.train.optim import adamw, param_groups
from copa.train.trainer import build_datasets, make_loader

log = logging.getLogger("profile_step")


def time_steps(objective: PretrainObjective, opt: torch.optim.Optimizer, batches: list, steps: int) -> float:
    """Median seconds of one full step (forward, backward, clip, optimizer) over ``steps`` runs."""
    times = []
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        out = objective(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/pretrain_tiny.yaml")
    ap.add_argument("--data", default="runs/demo/data")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--per-loss", action="store_true", help="also time each objective alone")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sets = [
        f"data.train={args.data}/train.json",
        f"data.val={args.data}/val.json",
        f"train.batch_size={args.batch}",
        *args.overrides,
    ]
    cfg = load_config(args.config, sets)
    torch.manual_seed(0)
    model = COPAModel(cfg.model).train()
    if cfg.train.freeze_text_layers:
        model.freeze(cfg.train.freeze_text_layers)
    loader = make_loader(build_datasets(cfg, ("train",))["train"], cfg, train=True)
    it = iter(loader)
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(3)]
    data_s = (time.perf_counter() - t0) / 3
    opt = adamw(param_groups(model, cfg.train))
    weights = dict(cfg.train.loss_weights)
    full = time_steps(PretrainObjective(model, weights), opt, batches, args.steps)
    print(f"{args.config} {' '.join(args.overrides)} batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"  data loading        {data_s * 1e3:8.0f} ms/batch")
    print(f"  full step           {full * 1e3:8.0f} ms   {args.batch / full:6.1f} samples/s")
    if args.per_loss:
        for name in LOSS_NAMES:
            if not weights.get(name):
                continue
            only = {k: (v if k == name else 0.0) for k, v in weights.items()}
            s = time_steps(PretrainObjective(model, only), opt, batches, args.steps)
            print(f"  {name:18s}  {s * 1e3:8.0f} ms")


if __name__ == "__main__":
    main()

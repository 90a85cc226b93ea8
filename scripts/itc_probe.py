"""ITC convergence probe: train the tiny preset with ITC alone for a few steps and report the loss,
the spread of the image / text embeddings and validation R@1/R@5 (first caption of each image).

This is how the text-encoder learning rate (``train.lr_text``) was chosen; see BENCHMARKS.md.

    python scripts/itc_probe.py --steps 60 --set train.lr_text=3e-4   # text at the new modules' rate
    python scripts/itc_probe.py --steps 60 --set train.lr_text=3e-5   # the default
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from copa.config import load_config
from copa.model.copa import COPAModel
from copa.train.losses import PretrainObjective
from copa.train.optim import for_training
from copa.train.trainer import build_datasets, make_loader
from copa.utils.device import autocast, resolve_precision

log = logging.getLogger("itc_probe")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/pretrain_tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, [f"train.steps={args.steps}", *args.overrides])
    torch.manual_seed(cfg.seed)
    model = COPAModel(cfg.model)
    objective = PretrainObjective(model, {"itc": 1.0})
    data = build_datasets(cfg, ("train", "val"))
    opt, sched = for_training(model, cfg.train)
    device = torch.device("cpu")
    dtype = resolve_precision(cfg.train.precision, device)
    batches = iter(make_loader(data["train"], cfg, train=True))
    t0 = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        with autocast(device, dtype):
            out = objective(next(batches))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.train.steps:
            log.info(
                "step %d itc %.3f (chance %.3f) %.0f s",
                step,
                float(out.losses["itc"].detach()),
                float(torch.log(torch.tensor(float(cfg.train.batch_size)))),
                time.perf_counter() - t0,
            )
    model.eval()
    val = make_loader(data["val"], cfg, train=False)
    imgs, txts = [], []
    with torch.no_grad(), autocast(device, dtype):
        for _, b in zip(
            range(len(data["val"]) // cfg.train.batch_size), val, strict=False
        ):  # the loader is endless
            imgs.append(model.encode_image(b.images).float())
            txts.append(model.encode_text(b.caption_ids, b.caption_mask).float())
    img, txt = torch.cat(imgs), torch.cat(txts)
    rank = (img @ txt.t()).argsort(1, descending=True)
    hit = rank == torch.arange(len(img))[:, None]
    log.info(
        "val images %d: i2t R@1 %.3f R@5 %.3f (random %.3f / %.3f); embedding spread (sum of per-dim std) "
        "image %.2f text %.2f",
        len(img),
        float(hit[:, :1].any(1).float().mean()),
        float(hit[:, :5].any(1).float().mean()),
        1 / len(img),
        5 / len(img),
        float(img.std(0).sum()),
        float(txt.std(0).sum()),
    )


if __name__ == "__main__":
    main()

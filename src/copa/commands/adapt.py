"""``copa adapt-stem``: re-estimate a conv stem's BatchNorm statistics on unlabelled images of a new
domain, every weight unchanged (AdaBN: Li et al., "Revisiting Batch Normalization for Practical
Domain Adaptation").

Why: the conv stem (``model.vision.stem: conv``) normalises with the mean and variance of its
training images. On scenes in a look the training data never had (other backgrounds, other shades)
those statistics are off, and everything downstream reads shifted features: COPA's selector kept
the queried object's patches at recall 0.75 on the demo's second scene style with the training
statistics and 0.93 with each batch's own (BENCHMARKS.md, session 8). Re-estimating them on a few
dozen images of the new domain needs no labels and no training step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from copa.config import Config
from copa.data.synth import SPLITS

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser(
        "adapt-stem",
        help="re-estimate the conv stem's BatchNorm statistics on unlabelled images of a new domain "
        "(AdaBN); writes the adapted model to OUT",
    )
    add_common(p, out_default="runs/adapted")
    p.add_argument("--ckpt", required=True, help="COPA model directory")
    p.add_argument(
        "--split",
        default="train",
        choices=SPLITS,
        help="the records file whose images are read (cfg.data.<split>; only the images are used)",
    )
    p.add_argument("--max-images", type=int, default=None, help="the first N images (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.evaluation import eval_loader
    from copa.model.copa import load

    model = load(args.ckpt)
    cfg = dataclasses.replace(cfg, model=model.cfg)  # the model's own image size and normalisation
    images = (batch.images for batch in eval_loader(cfg, args.split, args.max_images))
    n = model.adapt_stem_statistics(images)
    source = getattr(cfg.data, args.split)
    model.save_pretrained(args.out, extra={"provenance": {"adapted_from": str(args.ckpt), "images": source}})
    result = {"ckpt": str(args.ckpt), "images": n, "data": str(source), "out": str(args.out)}
    log.info("stem statistics re-estimated on %d images of %s -> %s", n, source, args.out)
    print(json.dumps(result, indent=2))
    return 0

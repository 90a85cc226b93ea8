"""VQA learning probe: fine-tune VQA from a checkpoint (or from scratch), then report the accuracy per
question type with the true image and with another image (the blind control), and how much of the
ViT's output is one shared vector (the collapse that makes a fusion answer blind).

This is how "What made the fusion read the image" in BENCHMARKS.md was measured:

    python scripts/vqa_probe.py --out /tmp/vq --steps 200 --set 'model.select.keep_ratios=[1.0]'
    python scripts/vqa_probe.py --out /tmp/vq --init runs/demo/pretrain/model --steps 200 \
        --set train.freeze_vit=true
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

from copa.config import load_config
from copa.model.copa import COPAModel, load
from copa.tasks.base import TaskOptions
from copa.tasks.finetune import finetune, run_evaluation
from copa.tasks.registry import make_task
from copa.train.trainer import make_loader

log = logging.getLogger("vqa_probe")
QUESTION_TYPES = ("how many", "what color", "what shape", "left or the right", "to the left of", "is there")


def question_type(q: str) -> str:
    return next((k for k in QUESTION_TYPES if k in q), "other")


@torch.no_grad()
def shared_share(model: COPAModel, images: torch.Tensor) -> float:
    """|mean patch token| / mean |patch token - that mean| at the ViT's output, before the final norm:
    ~1 for a fresh ViT; large when every patch of every image maps to nearly one vector."""
    v = model.vision
    x = v.embed(images)
    for blk in v.blocks:
        x = blk(x)
    p = x[:, 1:]
    mean = p.mean((0, 1))
    return float(mean.norm() / (p - mean).norm(dim=-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/pretrain_tiny.yaml")
    ap.add_argument("--data", default="data/synth", help="a `copa data synth` directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    d = args.data
    cfg = load_config(
        args.config,
        [
            f"data.train={d}/train.json",
            f"data.val={d}/val.json",
            f"data.test={d}/test.json",
            f"train.steps={args.steps}",
            "train.warmup=10",
            "train.lr=3e-4",
            "train.lr_vit=3e-4",
            "eval.blind_control=true",
            *args.overrides,
        ],
    )
    torch.manual_seed(0)
    task = make_task("vqa", TaskOptions(meteor=False))
    out = Path(args.out)
    finetune(task, cfg, out, init=args.init, eval_split=None)
    model = load(out / "model")
    res = run_evaluation(task, model, cfg, "val", out / "eval")
    by_type: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0.0])
    for line in (out / "eval" / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        row = by_type[question_type(p["question"])]
        row[0] += 1
        row[1] += p["score"]
        if "blind_score" in p:
            row[2] += 1
            row[3] += p["blind_score"]
    m = res.metrics
    val = task.build_dataset(cfg, "val", False, cfg.model.vision.image_size, cfg.model.vision.patch_size)
    images = next(iter(make_loader(val, cfg, train=False))).images
    log.info(
        "val: accuracy %.1f, with another image %.1f, majority %.1f; ViT shared/varying %.1f",
        m["accuracy"],
        m.get("blind_accuracy", float("nan")),
        m["baseline_accuracy"],
        shared_share(model, images),
    )
    for t, (n, s, nb, sb) in sorted(by_type.items()):
        log.info("  %-18s n=%4d accuracy %.3f with another image %.3f", t, n, s / n, sb / max(nb, 1))


if __name__ == "__main__":
    main()

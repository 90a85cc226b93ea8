"""``copa pretrain``: pre-train COPA (single process, or under torchrun for DDP/FSDP)."""

from __future__ import annotations

import argparse
import json
import logging

from copa.config import Config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common
    from copa.model.selection import SELECTORS

    p = sub.add_parser("pretrain", help="pre-train with ITC, ITM, MLM, PrefixLM and PTA")
    add_common(p, out_default="runs/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--init", default=None, help="start from a saved COPA model directory")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step, as a preemption would")
    p.add_argument(
        "--branch-from",
        default=None,
        metavar="RUN",
        help="start OUT as a branch of run directory RUN: copy its latest checkpoint and logs, then "
        "resume with this command's settings (ablations that share their first steps)",
    )
    p.set_defaults(func=run)

    q = sub.add_parser(
        "pta-stage", help="train only the selector with PTA on a pre-trained model (boxed images)"
    )
    add_common(q, out_default="runs/pta_stage")
    q.add_argument("--init", required=True, help="the pre-trained COPA model directory")
    q.add_argument("--steps", type=int, default=300, help="selector updates (default 300)")
    q.add_argument("--batch", type=int, default=16, help="boxed images per step (default 16)")
    q.add_argument("--lr", type=float, default=None, help="default: train.lr_selector, else train.lr")
    q.add_argument(
        "--views",
        type=int,
        default=0,
        help="augmented views of each boxed image, their frozen ViT prefix and phrase text computed "
        "once and replayed (a step then costs only the selector); 0 (default): a fresh augmentation "
        "every epoch, recomputed every step",
    )
    q.set_defaults(func=run_pta_stage)

    s = sub.add_parser(
        "stem-stage",
        help="warm-start the image stem on labelled objects (the words of each object's phrase) "
        "before pre-training; writes OUT/model for `copa pretrain --init` and OUT/stem.safetensors "
        "(the stem alone, for --stem)",
    )
    add_common(s, out_default="runs/stem_stage")
    s.add_argument(
        "--records",
        default=None,
        help="records whose objects carry boxes and phrases (JSON records, COCO, Visual Genome), "
        "e.g. the train_all_boxes.json of `copa data synth` made with another seed (not needed for "
        "--steps 0)",
    )
    s.add_argument("--init", default=None, help="a COPA model directory (default: a fresh model of --config)")
    s.add_argument(
        "--stem",
        default=None,
        help="start from a saved stem (an OUT/stem.safetensors of this command, e.g. the shipped "
        "copa/assets/stem_tiny.safetensors); with --steps 0 it is only put into the model and measured",
    )
    s.add_argument("--steps", type=int, default=400, help="stem updates (default 400)")
    s.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    s.add_argument(
        "--cover",
        type=float,
        default=0.0,
        help="also label every stem cell an object's box covers by at least this share of the cell's "
        "area (e.g. 0.25); 0 (default): only the cell under the object's centre",
    )
    s.set_defaults(func=run_stem_stage)

    r = sub.add_parser(
        "pta-eval",
        help="selection quality of a model's first selector on a split: object-patch "
        "recall and AP, text specificity; writes OUT/pta.json",
    )
    add_common(r, out_default="runs/pta_eval")
    r.add_argument("--ckpt", required=True, help="COPA model directory")
    r.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="data split (cfg.data.<split>)"
    )
    r.add_argument("--keep-ratio", type=float, default=None, help="keep ratio (default: the model's first)")
    r.add_argument(
        "--max-images", type=int, default=None, help="the first N images of the split (default: all)"
    )
    r.add_argument(
        "--selector",
        default=None,
        choices=SELECTORS,
        help="swap in a parameter-free selector (none, random, tome, cls_attn, text_attn) on the "
        "same weights",
    )
    r.set_defaults(func=run_pta_eval)


def run_pta_stage(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train.selector_stage import run_stage

    summary = run_stage(args.init, cfg, args.out, args.steps, args.batch, args.lr, args.views)
    print(json.dumps(summary, indent=2))
    return 0


def run_stem_stage(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train.stem_stage import run_stem_stage as stage

    cover = None if args.cover == 0 else args.cover  # anything else is checked by the stage
    summary = stage(cfg, args.records, args.out, args.steps, args.batch, args.lr, args.init, cover, args.stem)
    print(json.dumps({k: v for k, v in summary.items() if k != "vocabulary"}, indent=2))
    return 0


def run_pta_eval(args: argparse.Namespace, cfg: Config) -> int:
    import dataclasses
    from pathlib import Path

    from copa.config import ConfigError
    from copa.evaluation import pta_eval, with_selector
    from copa.model.copa import load

    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {args.keep_ratio} is outside (0, 1]")
    model = load(args.ckpt)
    cfg = dataclasses.replace(cfg, model=model.cfg)  # the model's own image size and tokenizer
    keep = model.cfg.select.keep_ratios[0] if args.keep_ratio is None else args.keep_ratio
    view = with_selector(model, args.selector) if args.selector else model
    metrics = pta_eval(view, cfg, args.split, keep, args.max_images)
    result = {
        "ckpt": str(args.ckpt),
        "split": args.split,
        "selector": args.selector or model.cfg.select.selector,
        "keep_ratio": keep,
        "max_images": args.max_images,
        "metrics": metrics,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pta.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train import distributed as D
    from copa.train.loop import NonFiniteLossError
    from copa.train.trainer import pretrain

    try:
        res = pretrain(
            cfg,
            args.out,
            resume=args.resume,
            init=args.init,
            stop_at=args.stop_at,
            branch_from=args.branch_from,
        )
        if D.is_main():
            print(json.dumps({"out": str(res.out), "steps": res.steps, **res.final}, indent=2))
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    finally:
        D.cleanup()
    return 0

"""``copa finetune TASK`` and ``copa evaluate TASK`` for TASK in retrieval, vqa, caption, grounding.

    copa finetune vqa --config configs/tiny.yaml --init runs/pretrain/model --out runs/vqa
    copa evaluate vqa --ckpt runs/vqa/model --split test --out runs/vqa/test [--keep-ratio 1.0]

Both write ``metrics.json`` and ``predictions.jsonl`` into ``--out`` and print the metrics as JSON.
Task flags left unset on ``evaluate`` fall back to those the model was fine-tuned with (e.g. the
captioning prompt), then to the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from copa.config import Config, ConfigError
from copa.tasks.grounding import BOX_TARGETS
from copa.tasks.registry import TASK_NAMES

log = logging.getLogger(__name__)


def _task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASK_NAMES, help="downstream task")
    p.add_argument(
        "--prompt", default=None, help='captioning prompt for the encoder side (default "a picture of")'
    )
    p.add_argument(
        "--decode",
        choices=["greedy", "beam"],
        default=None,
        help="generation for vqa / caption (default: vqa greedy, caption beam)",
    )
    p.add_argument(
        "--answer-list",
        default=None,
        metavar="FILE|train",
        help="vqa: rank these candidate answers by likelihood instead of generating",
    )
    p.add_argument(
        "--itc-weight",
        type=float,
        default=None,
        help="retrieval: final score = ITM log-odds + w * ITC similarity (default 1)",
    )
    p.add_argument(
        "--no-meteor",
        dest="meteor",
        action="store_false",
        default=None,
        help="caption: skip METEOR (saves a java start-up)",
    )
    p.add_argument(
        "--random-crop", action="store_true", default=None, help="random resized crop when fine-tuning"
    )
    p.add_argument(
        "--box-targets",
        choices=BOX_TARGETS,
        default=None,
        help="grounding: train every patch inside the box (default) or the one nearest its centre",
    )


def _options(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Any:
    """TaskOptions: explicit flags, then the options stored with the model, then the defaults."""
    from copa.tasks.base import TaskOptions

    values = {k: v for k, v in (saved or {}).items() if k in TaskOptions.__dataclass_fields__}
    flags = {
        "prompt": args.prompt,
        "decode": args.decode,
        "answer_list": args.answer_list,
        "itc_weight": args.itc_weight,
        "meteor": args.meteor,
        "random_crop": args.random_crop,
        "box_targets": args.box_targets,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return TaskOptions(**values)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common
    from copa.model.selection import SELECTORS

    p = sub.add_parser("finetune", help="fine-tune a COPA model on a downstream task, then evaluate it")
    _task_flags(p)
    add_common(p, out_default="runs/finetune")
    p.add_argument(
        "--init", default=None, help="COPA model directory to start from (e.g. a pretrain run's OUT/model)"
    )
    p.add_argument("--eval-split", default="val", help="split evaluated after training (val/test/none)")
    p.set_defaults(func=run_finetune)

    e = sub.add_parser("evaluate", help="evaluate a COPA model on a downstream task")
    _task_flags(e)
    add_common(e, out_default="runs/eval")
    e.add_argument("--ckpt", required=True, help="COPA model directory (e.g. a finetune run's OUT/model)")
    e.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="data split (cfg.data.<split>)"
    )
    e.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="keep ratio at evaluation (1.0 = unpruned); default cfg.eval.keep_ratio, else the model's",
    )
    e.add_argument(
        "--selector",
        default=None,
        choices=SELECTORS,
        help="evaluate with a parameter-free selector swapped in (same weights): an ablation",
    )
    e.add_argument(
        "--selectors-from",
        default=None,
        metavar="CKPT",
        help="evaluate with the trained selectors of another model of the same selection config "
        "(e.g. another pre-training row of the same trunk), same weights otherwise",
    )
    e.set_defaults(func=run_evaluate)


def _print(metrics: dict[str, Any]) -> None:
    print(json.dumps(metrics, indent=2, sort_keys=True))  # the CLI's one final JSON summary


def run_finetune(args: argparse.Namespace, cfg: Config) -> int:
    from copa.tasks.finetune import finetune
    from copa.tasks.registry import make_task
    from copa.train import distributed as D
    from copa.train.loop import NonFiniteLossError

    split = None if args.eval_split in ("", "none") else args.eval_split
    try:
        res = finetune(make_task(args.task, _options(args)), cfg, args.out, init=args.init, eval_split=split)
    except NonFiniteLossError as e:
        log.error("fine-tuning stopped: %s", e)
        return 3
    finally:
        D.cleanup()
    if D.is_main():
        head = {
            "out": str(res.out),
            "steps": res.steps,
            "first_loss": res.first_loss,
            "last_loss": res.last_loss,
        }
        _print({**head, **(res.eval.metrics if res.eval else {})})
    return 0


def run_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from copa.tasks.finetune import evaluate_checkpoint, saved_meta
    from copa.tasks.registry import make_task
    from copa.train import distributed as D

    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {args.keep_ratio} is outside (0, 1]")
    meta = saved_meta(args.ckpt)
    if meta.get("task") not in (None, args.task):
        log.warning("%s was fine-tuned for %s, evaluating it on %s", args.ckpt, meta["task"], args.task)
    saved = meta.get("options") if meta.get("task") == args.task else None
    if args.selector and args.selectors_from:
        raise ConfigError("--selector and --selectors-from exclude each other")
    task = make_task(args.task, _options(args, saved))
    try:
        if args.selector or args.selectors_from:
            res = _evaluate_swapped(task, args, cfg)
        else:
            res = evaluate_checkpoint(task, args.ckpt, cfg, args.split, args.out, args.keep_ratio)
        if D.is_main():
            _print(res.metrics)
    finally:
        D.cleanup()
    return 0


def _evaluate_swapped(task: Any, args: argparse.Namespace, cfg: Config) -> Any:
    """``evaluate`` of the checkpoint with another selection (``--selector`` / ``--selectors-from``)."""
    from copa.evaluation import with_selector, with_selectors_of
    from copa.model.copa import load
    from copa.tasks.finetune import run_evaluation
    from copa.train import distributed as D

    device = D.init_from_env()
    model = load(args.ckpt)
    try:
        view = (
            with_selectors_of(model, load(args.selectors_from))
            if args.selectors_from
            else with_selector(model, args.selector)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return run_evaluation(task, view.to(device).eval(), cfg, args.split, args.out, args.keep_ratio)

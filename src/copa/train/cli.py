"""``copa pretrain``: pre-train COPA (single process, or under torchrun for DDP/FSDP)."""

from __future__ import annotations

import argparse
import json
import logging

from copa.config import Config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("pretrain", help="pre-train with ITC, ITM, MLM, PrefixLM and PTA")
    add_common(p, out_default="runs/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--init", default=None, help="start from a saved COPA model directory")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step, as a preemption would")
    p.add_argument("--branch-from", default=None, metavar="RUN",
                   help="start OUT as a branch of run directory RUN: copy its latest checkpoint and logs, then "
                   "resume with this command's settings (ablations that share their first steps)")
    p.set_defaults(func=run)

    q = sub.add_parser("pta-stage", help="train only the selector with PTA on a pre-trained model (boxed images)")
    add_common(q, out_default="runs/pta_stage")
    q.add_argument("--init", required=True, help="the pre-trained COPA model directory")
    q.add_argument("--steps", type=int, default=300, help="selector updates (default 300)")
    q.add_argument("--batch", type=int, default=16, help="boxed images per step (default 16)")
    q.add_argument("--lr", type=float, default=None, help="default: train.lr_selector, else train.lr")
    q.set_defaults(func=run_pta_stage)


def run_pta_stage(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train.selector_stage import run_stage

    print(json.dumps(run_stage(args.init, cfg, args.out, args.steps, args.batch, args.lr), indent=2))
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train import distributed as D
    from copa.train.loop import NonFiniteLossError
    from copa.train.trainer import pretrain

    try:
        res = pretrain(cfg, args.out, resume=args.resume, init=args.init, stop_at=args.stop_at,
                       branch_from=args.branch_from)
        if D.is_main():
            print(json.dumps({"out": str(res.out), "steps": res.steps, **res.final}, indent=2))
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    finally:
        D.cleanup()
    return 0

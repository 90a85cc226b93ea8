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


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.train import distributed as D
    from copa.train.trainer import NonFiniteLossError, pretrain

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

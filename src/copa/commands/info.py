"""``copa info``: the resolved config and parameter counts of a preset, without training."""

from __future__ import annotations

import argparse
import json
import logging

import torch

from copa.config import Config, to_dict

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("info", help="show the resolved config and parameter counts")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.model.copa import COPAModel

    with torch.device("meta"):  # counts without allocating or loading weights
        model = COPAModel(cfg.model, load_text_weights=False)
    info = {
        "config": to_dict(cfg),
        "parameters": model.num_parameters(),
        "patches": model.num_patches,
        "keep_ratios": cfg.model.select.keep_ratios,
    }
    print(json.dumps(info, indent=2))
    return 0

"""``copa convert``: build a COPA model from local pretrained checkpoints, ready for ``--init``.

Vision weights come from a local ``transformers`` CLIP or ViT directory (converted, position
embeddings interpolated to ``model.vision.image_size``); the text encoder (and the fusion/decoder
initialisation) from ``model.text.pretrained``. The vision architecture is taken from the
checkpoint, so the config only needs to agree on what the checkpoint cannot say (selection, sizes
of the other parts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from copa.config import Config, to_dict

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("convert", help="build a COPA model from local CLIP/ViT + BERT checkpoints")
    add_common(p, out_default="runs/init")
    p.add_argument("--vision", required=True, help="local transformers CLIP or ViT checkpoint directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.model.convert import load_from_local, preprocess_from_local
    from copa.model.copa import COPAModel

    vcfg, state = load_from_local(args.vision)
    # the checkpoint fixes the architecture; the config keeps the resolution it asks for
    cfg.model.vision = dataclasses.replace(
        vcfg, image_size=cfg.model.vision.image_size, drop_path=cfg.model.vision.drop_path
    )
    cfg.model.preprocess = preprocess_from_local(args.vision)  # the normalisation its weights expect
    model = COPAModel(cfg.model)
    report = model.load_vision_weights(state)
    model.save_pretrained(
        args.out, extra={"provenance": {"vision": str(args.vision), "text": cfg.model.text.pretrained}}
    )
    info = {
        "out": args.out,
        "resized_pos_embed": report.resized_pos_embed,
        "parameters": model.num_parameters(),
        "preprocess": to_dict(cfg.model.preprocess),
    }
    print(json.dumps(info, indent=2))
    return 0

"""Shared fixtures: a micro COPA config that exercises every real code path in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

MICRO = [
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=64",
    "model.vision.layers=4", "model.vision.heads=4",
    "model.select.layers=[2]", "model.select.keep_ratios=[0.5]", "model.select.tpd_hidden=32",
    "model.text.pretrained=", "model.text.layers=2", "model.text.width=64", "model.text.heads=4",
    "model.text.intermediate=128",
    "model.fusion.layers=2", "model.fusion.stride=2", "model.fusion.heads=4",
    "model.decoder.layers=2", "model.decoder.heads=4", "model.embed_dim=32",
]


def micro_config(*overrides: str):
    from copa.config import load_config

    return load_config("configs/tiny.yaml" if os.path.exists("configs/tiny.yaml") else None, MICRO + list(overrides))


@pytest.fixture
def micro_cfg():
    return micro_config


@pytest.fixture
def micro_model():
    from copa.model.copa import COPAModel

    torch.manual_seed(0)
    return COPAModel(micro_config().model).eval()

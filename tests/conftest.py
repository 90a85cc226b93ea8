"""Shared fixtures: a micro COPA config that exercises every real code path in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

MICRO = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=64",
    "model.vision.layers=4",
    "model.vision.heads=4",
    "model.select.layers=[2]",
    "model.select.keep_ratios=[0.5]",
    "model.select.tpd_hidden=32",
    "model.text.pretrained=",
    "model.text.layers=2",
    "model.text.width=64",
    "model.text.heads=4",
    "model.text.intermediate=128",
    "model.fusion.layers=2",
    "model.fusion.stride=2",
    "model.fusion.heads=4",
    "model.decoder.layers=2",
    "model.decoder.heads=4",
    "model.embed_dim=32",
]


def micro_config(*overrides: str):
    from copa.config import load_config

    return load_config(
        "configs/tiny.yaml" if os.path.exists("configs/tiny.yaml") else None, MICRO + list(overrides)
    )


@pytest.fixture
def micro_cfg():
    return micro_config


@pytest.fixture
def micro_model():
    from copa.model.copa import COPAModel

    torch.manual_seed(0)
    return COPAModel(micro_config().model).eval()


@pytest.fixture(scope="module")
def micro_init(tmp_path_factory):
    """A saved micro COPA model (random weights) to fine-tune from."""
    from copa.model.copa import COPAModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "model"
    COPAModel(micro_config().model).save_pretrained(path)
    return path


TRAIN_MICRO = [
    "train.batch_size=4",
    "train.warmup=2",
    "train.log_every=1",
    "train.val_every=1000",
    "train.ckpt_every=1000",
    "train.precision=fp32",
    "train.lr=1e-3",
    "train.lr_vit=1e-3",
    "data.box_share=0.5",
]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic scene set (64 px) written once per test session."""
    from copa.data.synth import write_synth

    out = tmp_path_factory.mktemp("synth")
    write_synth(out, seed=0, n_train=24, n_val=8, n_test=8, image_size=64, box_share=0.5)
    return out


def train_config(data_dir, *overrides: str):
    """Micro model + micro training on ``data_dir``'s synthetic scenes."""
    return micro_config(
        *TRAIN_MICRO,
        f"data.train={data_dir}/train.json",
        f"data.val={data_dir}/val.json",
        f"data.test={data_dir}/test.json",
        *overrides,
    )


@pytest.fixture(scope="session")
def micro_ckpt(tmp_path_factory):
    """A saved micro COPA model (random weights), as ``save_pretrained`` writes it; read-only."""
    from copa.model.copa import COPAModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    COPAModel(micro_config().model).save_pretrained(path)
    return path


def scene_png(path, size=(48, 40), seed=0):
    """A small RGB PNG with two coloured shapes on a noisy background (not square on purpose)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(90, 140, (size[1], size[0], 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([4, 4, 20, 20], fill=(220, 30, 30))
    d.rectangle([size[0] - 20, size[1] - 18, size[0] - 4, size[1] - 3], fill=(30, 40, 220))
    img.save(path)
    return path

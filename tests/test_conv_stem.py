"""The early-convolution stem (``model.vision.stem=conv``): same token grid as the patch embedding,
trained by the losses above it, left alone when the ViT is frozen, saved and loaded, and checked in
the config."""

from __future__ import annotations

import pytest
import torch

from copa.config import ConfigError
from copa.model.copa import COPAModel, load
from copa.model.vit import ConvStem
from tests.conftest import micro_config


def _model(stem: str) -> COPAModel:
    torch.manual_seed(0)
    return COPAModel(micro_config(f"model.vision.stem={stem}").model)


def test_conv_stem_gives_the_patch_grid_and_one_conv_per_halving():
    stem = ConvStem(64, 8)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]  # 8 = 2^3, then the 1x1 projection
    assert stem(torch.randn(2, 3, 32, 48)).shape == (2, 64, 4, 6)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(64, 12)


def test_conv_stem_model_tokens_match_the_patch_model_and_train(tmp_path):
    conv, patch = _model("conv"), _model("patch")
    images = torch.randn(2, 3, 32, 32)
    out = conv.vision(images)
    assert out.tokens.shape == patch.vision(images).tokens.shape
    out.tokens.square().mean().backward()
    first = conv.vision.patch_embed.layers[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    conv.eval().save_pretrained(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.cfg.vision.stem == "conv"
    with torch.no_grad():
        assert torch.equal(again.vision(images).tokens, conv.vision(images).tokens)


def test_frozen_conv_stem_stays_as_it_is_in_training_mode():
    m = _model("conv").train()
    m.freeze(0, vit=True)  # after train(): the stem must still stop updating its statistics
    before = {k: v.clone() for k, v in m.vision.patch_embed.state_dict().items()}
    assert not any(p.requires_grad for p in m.vision.patch_embed.parameters())
    with torch.no_grad():
        a = m.vision(torch.randn(4, 3, 32, 32)).tokens
        m.vision(torch.randn(4, 3, 32, 32) * 5 + 1)  # a batch that would move BatchNorm statistics
        b = m.vision(torch.randn(1, 3, 32, 32)).tokens
    after = m.vision.patch_embed.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert a.shape[1:] == b.shape[1:]


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["model.vision.stem=cnn"], "stem"),
        (
            ["model.vision.stem=conv", "model.vision.patch_size=12", "model.vision.image_size=36"],
            "power-of-two",
        ),
    ],
)
def test_stem_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        micro_config(*sets)

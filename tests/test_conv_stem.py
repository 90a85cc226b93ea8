"""The early-convolution stem (``model.vision.stem=conv``): same token grid as the patch embedding,
trained by the losses above it, left alone when the ViT is frozen, saved and loaded, and checked in
the config."""

from __future__ import annotations

import pytest
import torch

from copa.config import ConfigError
from copa.errors import UserError
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


def test_adapt_statistics_are_the_new_images_own_and_nothing_else_moves():
    """AdaBN: every BatchNorm's running mean / variance become those of the new images (one average
    over all batches); weights, the mode and the other buffers stay; no image changes nothing."""
    model = _model("conv").eval()
    stem = model.vision.patch_embed
    weights = {k: v.clone() for k, v in stem.state_dict().items() if "running" not in k}
    shifted = [torch.randn(4, 3, 32, 32) * 2.0 + 1.5 for _ in range(2)]
    assert model.adapt_stem_statistics(iter(shifted)) == 8
    conv0, bn0 = stem.layers[0], stem.layers[1]
    with torch.no_grad():
        ys = [conv0(x) for x in shifted]
    # BatchNorm's cumulative average: of the batches' means and (unbiased) variances
    assert torch.allclose(bn0.running_mean, torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0), atol=1e-5)
    assert torch.allclose(bn0.running_var, torch.stack([y.var((0, 2, 3)) for y in ys]).mean(0), rtol=1e-4)
    assert all(torch.equal(v, stem.state_dict()[k]) for k, v in weights.items())
    assert not stem.training
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    with pytest.raises(UserError, match="no image"):
        model.adapt_stem_statistics(iter([]))
    assert all(torch.equal(v, stem.state_dict()[k]) for k, v in before.items())
    with pytest.raises(UserError, match="only a conv stem"):
        _model("patch").adapt_stem_statistics(iter(shifted))


def test_cli_adapt_stem_writes_a_model_with_the_new_statistics(synth_dir, tmp_path):
    from copa.cli import main

    model = _model("conv").eval()
    model.save_pretrained(tmp_path / "m")
    sets = ["--set", f"data.train={synth_dir}/train.json"]
    out = tmp_path / "adapted"
    assert (
        main(["adapt-stem", *sets, "--ckpt", str(tmp_path / "m"), "--max-images", "6", "--out", str(out)])
        == 0
    )
    adapted = load(out)
    a, b = adapted.state_dict(), model.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all("running_" in k for k in moved), sorted(moved)[:4]

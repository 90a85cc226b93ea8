"""Stochastic depth in the ViT: per sample, training only, rising linearly over depth."""

from __future__ import annotations

import pytest
import torch

from copa.config import SelectConfig, VisionConfig
from copa.model.layers import DropPath, ViTBlock
from copa.model.vit import VisionTransformer

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "heads": 2}


def _vit(drop_path: float) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        VisionConfig(**VISION, drop_path=drop_path),
        SelectConfig(selector="none", layers=[2], keep_ratios=[1.0]),
        text_dim=16,
    )


def test_drop_path_rates_rise_linearly_over_depth():
    rates = [blk.drop_path.p for blk in _vit(0.3).blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="drop path"):
        _vit(1.0)


def test_drop_path_leaves_eval_unchanged_and_drops_in_training():
    plain, dropped = _vit(0.0), _vit(0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x).tokens, dropped.eval()(x).tokens)
        plain.train(), dropped.train()
        ref = plain(x).tokens
        assert torch.equal(plain(x).tokens, ref)  # no other randomness in training
        torch.manual_seed(1)
        a = dropped(x).tokens
        torch.manual_seed(2)
        b = dropped(x).tokens
    assert not torch.equal(a, ref) and not torch.equal(a, b)


def test_block_drops_residual_branches_per_sample():
    torch.manual_seed(0)
    blk = ViTBlock(32, 2, drop_path=0.5).train()
    x = torch.randn(64, 5, 32)
    with torch.no_grad():
        y = blk(x)
        unchanged = (y == x).flatten(1).all(1)  # both branches dropped: p = 0.25 per sample
        assert 4 <= int(unchanged.sum()) <= 30
        ref = ViTBlock(32, 2).eval()
        ref.load_state_dict(blk.state_dict())
        assert torch.equal(blk.eval()(x), ref(x))


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    y = dp(torch.ones(4000, 3, 5))
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert (per_sample[:, 0] == 0).float().mean() == pytest.approx(0.25, abs=0.03)
    assert y.mean() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))

"""The patch-anchored grounding head: box decoding around each kept patch, the responsible-patch
loss, and its use on pruned and unpruned fused states."""

from __future__ import annotations

import math

import pytest
import torch

from copa.model.heads import PatchBoxHead
from copa.tasks.grounding import patch_box_loss


def test_boxes_stay_near_their_patch_and_best_score_wins():
    torch.manual_seed(0)
    head = PatchBoxHead(16, reach=1.5)
    grid = 4
    index = torch.tensor([[0, 5, 15], [3, 12, 6]])  # (B=2, K=3) row-major patch indices
    tokens, text = torch.randn(2, 3, 16), torch.randn(2, 16)
    out = head(tokens, text, index, grid)
    assert out.boxes.shape == (2, 3, 4) and out.scores.shape == (2, 3) and out.box.shape == (2, 4)
    # patch 5 on a 4x4 grid is row 1, column 1: centre (1.5/4, 1.5/4)
    assert torch.allclose(out.centres[0, 1], torch.tensor([1.5 / 4, 1.5 / 4]))
    assert torch.allclose(out.centres[1, 0], torch.tensor([3.5 / 4, 0.5 / 4]))  # patch 3: row 0, column 3
    offset = (out.boxes[..., :2] - out.centres).abs()
    assert bool((offset <= 1.5 / grid + 1e-6).all())
    assert bool(((out.boxes[..., 2:] > 0) & (out.boxes[..., 2:] < 1)).all())
    best = out.scores.argmax(1)
    assert torch.equal(out.box, out.boxes[torch.arange(2), best])


def test_loss_trains_the_patch_nearest_the_true_centre():
    torch.manual_seed(0)
    head = PatchBoxHead(8)
    grid = 4
    index = torch.tensor([[0, 10, 15]])  # patch 10: row 2, column 2, centre (0.625, 0.625)
    tokens = torch.randn(1, 3, 8, requires_grad=True)
    out = head(tokens, torch.randn(1, 8), index, grid)
    target = torch.tensor([[0.6, 0.7, 0.2, 0.2]])
    parts = patch_box_loss(out, target, torch.tensor([True]), targets="centre")
    assert math.isclose(
        float(parts["patch_ce"].detach()), float(-out.scores.detach().log_softmax(1)[0, 1]), rel_tol=1e-5
    )
    parts["loss"].backward()
    # only the responsible patch's box is regressed; the others get gradient through the scores only
    g = tokens.grad.abs().sum(-1)[0]
    assert bool((g > 0).all())
    # a dropped true-centre patch hands the job to the nearest kept one: patch 15, centre (0.875, 0.875)
    out2 = head(tokens.detach(), torch.randn(1, 8), torch.tensor([[0, 5, 15]]), grid)
    p2 = patch_box_loss(out2, target, torch.tensor([True]), targets="centre")
    assert math.isclose(float(p2["patch_ce"]), float(-out2.scores.log_softmax(1)[0, 2]), rel_tol=1e-5)


def test_ground_on_pruned_and_unpruned_model(micro_model):
    m = micro_model
    images = torch.randn(2, 3, m.cfg.vision.image_size, m.cfg.vision.image_size)
    ids = torch.tensor([[101, 2417, 4418, 102], [101, 2630, 2675, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        pruned = m.ground(m(images, ids, mask))
        full = m.ground(m(images, ids, mask, keep_ratios=[1.0] * len(m.cfg.select.layers)))
    n = m.vision.num_patches
    assert full.scores.shape == (2, n) and pruned.scores.shape[1] < n
    assert bool(((pruned.box >= -0.5) & (pruned.box <= 1.5)).all())


def test_inside_targets_train_every_patch_inside_the_box_centre_weighted():
    torch.manual_seed(0)
    head = PatchBoxHead(8)
    grid = 4
    index = torch.arange(16)[None]  # every patch of a 4x4 grid
    tokens = torch.randn(1, 16, 8, requires_grad=True)
    out = head(tokens, torch.randn(1, 8), index, grid)
    # a box over the 2x2 patches 5, 6, 9, 10 (centres 0.375 / 0.625), its centre nearer patch 10
    target = torch.tensor([[0.55, 0.55, 0.5, 0.5]])
    parts = patch_box_loss(out, target, torch.tensor([True]), targets="inside")
    inside = [5, 6, 9, 10]
    # the box regression reaches exactly the patches inside; the others get the scores' gradient only
    box_only = (
        torch.autograd.grad(parts["l1"] + parts["giou"], out.boxes, retain_graph=True)[0].abs().sum(-1)[0]
    )
    parts["loss"].backward()
    g = tokens.grad.abs().sum(-1)[0]
    assert set(torch.nonzero(box_only).flatten().tolist()) == set(inside) and bool((g > 0).all())
    # the soft target: centre-weighted over the four, nearest the centre weighs most
    logp = out.scores.detach().log_softmax(1)[0]
    d = (out.centres[0, inside] - target[0, :2]).abs() / 0.25
    q = torch.exp(-d.square().sum(-1))
    q = q / q.sum()
    assert math.isclose(float(parts["patch_ce"]), float(-(q * logp[inside]).sum()), rel_tol=1e-5)
    assert int(q.argmax()) == inside.index(10)
    # a box smaller than a patch, between centres: the nearest patch alone, as with "centre"
    small = torch.tensor([[0.5, 0.5, 0.05, 0.05]])
    a = patch_box_loss(out, small, torch.tensor([True]), targets="inside")
    b = patch_box_loss(out, small, torch.tensor([True]), targets="centre")
    for key in ("patch_ce", "l1", "giou"):
        assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-5), key
    # a box far smaller than a patch, off every centre: the nearest patch still trains (no 0/0)
    tiny = patch_box_loss(out, torch.tensor([[0.51, 0.49, 0.002, 0.002]]), torch.tensor([True]))
    assert all(math.isfinite(float(tiny[k])) for k in ("patch_ce", "l1", "giou", "loss"))


def test_box_targets_flag_reaches_the_task_and_is_stored_with_the_model(tmp_path):
    import argparse

    from copa.tasks.base import TaskOptions
    from copa.tasks.cli import _options

    flags = {"prompt": None, "decode": None, "answer_list": None, "itc_weight": None, "meteor": None}
    args = argparse.Namespace(**flags, random_crop=None, box_targets="centre")
    assert _options(args).box_targets == "centre" and TaskOptions().box_targets == "inside"
    none = argparse.Namespace(**flags, random_crop=None, box_targets=None)
    assert _options(none, {"box_targets": "centre"}).box_targets == "centre"  # what the model was tuned with
    with pytest.raises(ValueError, match="box targets"):
        patch_box_loss(
            PatchBoxHead(8)(torch.randn(1, 2, 8), torch.randn(1, 8), torch.tensor([[0, 1]]), 2),
            torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
            torch.tensor([True]),
            targets="corner",
        )


def test_box_context_reads_the_3x3_neighbours_and_nothing_further():
    torch.manual_seed(0)
    head = PatchBoxHead(16, context=8)
    grid = 4
    index = torch.tensor([[5, 6, 10, 15]])  # 5, 6, 10 are neighbours; 15 is two rows below 5
    tokens = torch.randn(1, 4, 16)
    base = head(tokens, torch.randn(1, 16), index, grid).boxes
    moved = tokens.clone()
    moved[0, 3] += 1.0  # patch 15
    far = head(moved, torch.randn(1, 16), index, grid).boxes
    assert torch.equal(far[0, 0], base[0, 0]) and not torch.equal(far[0, 2], base[0, 2])  # 10 touches 15
    moved = tokens.clone()
    moved[0, 1] += 1.0  # patch 6, next to 5
    near = head(moved, torch.randn(1, 16), index, grid).boxes
    assert not torch.equal(near[0, 0], base[0, 0])
    # a pruned set (holes in the grid) and the patch order do not matter beyond the neighbours
    perm = torch.tensor([2, 0, 3, 1])
    again = head(tokens[:, perm], torch.randn(1, 16), index[:, perm], grid).boxes
    torch.testing.assert_close(again, base[:, perm])
    assert PatchBoxHead(16).reduce is None  # context 0: the patch alone, as models saved before it


def test_models_saved_before_box_context_load_with_their_own_head(tmp_path):
    import json

    from copa.config import ConfigError, check_model_config
    from copa.model.copa import COPAModel
    from tests.conftest import micro_config

    cfg = micro_config("model.box_context=0").model
    torch.manual_seed(0)
    old = COPAModel(cfg)
    old.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["box_context"]  # as written before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = COPAModel.from_pretrained(tmp_path / "old")
    assert loaded.cfg.box_context == 0 and loaded.box_head.reduce is None
    new = COPAModel(micro_config().model)
    assert new.cfg.box_context == 64
    new.save_pretrained(tmp_path / "new")
    assert COPAModel.from_pretrained(tmp_path / "new").box_head.context is not None
    with pytest.raises(ConfigError, match="box_context"):
        check_model_config(micro_config("model.box_context=-1").model)

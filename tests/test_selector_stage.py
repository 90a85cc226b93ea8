"""The PTA stage for the selector alone: only the selector moves, PTA falls, flags are restored,
and a dataset without boxes is a clear user error."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from copa.errors import UserError
from copa.model.copa import COPAModel
from copa.train.selector_stage import StepInputs, train_selector
from tests.conftest import train_config


def test_only_the_selector_learns_and_pta_falls(synth_dir):
    cfg = train_config(synth_dir, "train.pta_contrast=1.0")
    torch.manual_seed(0)
    model = COPAModel(cfg.model)
    model.text.freeze(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = train_selector(model, cfg, steps=80, batch_size=4, lr=3e-3)
    assert res.steps == 80 and res.boxed_images > 0
    assert res.last_loss < 0.8 * res.first_loss, res
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("vision.selectors.0.") for k in moved), sorted(moved)[:5]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_no_boxes_and_parameter_free_selectors_are_user_errors(synth_dir, tmp_path):
    recs = [r | {"objects": []} for r in json.loads((synth_dir / "train.json").read_text())]
    for r in recs:  # the image paths are relative to the original file
        r["image"] = str(synth_dir / r["image"])
    (tmp_path / "train.json").write_text(json.dumps(recs))
    cfg = train_config(synth_dir, f"data.train={tmp_path}/train.json")
    with pytest.raises(UserError, match="carries boxes"):
        train_selector(COPAModel(cfg.model), cfg, steps=2)
    cfg = train_config(synth_dir, "model.select.selector=cls_attn")
    with pytest.raises(UserError, match="no parameters"):
        train_selector(COPAModel(cfg.model), cfg, steps=2)


def test_replayed_views_are_the_same_steps_computed_once(synth_dir):
    """``views``: the first batches' frozen inputs are computed once and replayed; up to the last
    distinct batch the stage is step for step the un-cached one, and past it every pass replays each
    kept batch exactly once."""
    cfg = train_config(synth_dir, "train.pta_contrast=1.0")
    torch.manual_seed(0)
    init = COPAModel(cfg.model).state_dict()
    runs = {}
    for views in (0, 1):
        model = COPAModel(cfg.model)
        model.load_state_dict(init)
        res = train_selector(model, cfg, steps=3, batch_size=4, lr=3e-3, views=views)
        runs[views] = (res, model.state_dict())
    one = runs[1][0]
    assert one.views == 1 and one.distinct_batches == 3 and runs[0][0].distinct_batches == 3
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())

    model = COPAModel(cfg.model)
    model.load_state_dict(init)
    res = train_selector(model, cfg, steps=30, batch_size=4, lr=3e-3, views=1)
    assert 0 < res.distinct_batches < 30 and res.last_loss < 0.9 * res.first_loss, res

    batches = iter([SimpleNamespace(i=i) for i in range(4)])
    inputs = StepInputs(model, batches, 4, seed=0)
    inputs.compute = lambda b: (b, torch.zeros(1), torch.zeros(1))  # the replay, not the model
    seen = [next(inputs)[0].i for _ in range(12)]
    assert seen[:4] == [0, 1, 2, 3]
    assert sorted(seen[4:8]) == sorted(seen[8:]) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="views"):
        train_selector(model, cfg, steps=2, views=-1)

"""Pre-training under another selection: ``--init`` with a new ``model.select`` saves the model it
trained; the attention selectors (cls_attn, text_attn) under FSDP."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from copa.model.copa import COPAModel
from copa.train.losses import PretrainObjective
from copa.train.trainer import pretrain
from tests.conftest import train_config
from tests.test_pretrain import _batch, _torchrun


def test_init_with_another_selection_saves_the_model_it_trained(synth_dir, tmp_path, monkeypatch):
    over = ["train.steps=1", "model.text.layers=1"]
    pretrain(train_config(synth_dir, *over), tmp_path / "a")  # selects before block 2
    trained = {}
    real_save = COPAModel.save_pretrained

    def keep(self, path, *a, **k):  # the model object as trained, when the run saves its final copy
        if Path(path).name == "model":
            trained["model"] = copy.deepcopy(self).eval()
        return real_save(self, path, *a, **k)

    monkeypatch.setattr(COPAModel, "save_pretrained", keep)
    cfg = train_config(synth_dir, *over, "model.select.layers=[1]", "model.select.keep_ratios=[0.25]")
    pretrain(cfg, tmp_path / "b", init=str(tmp_path / "a" / "model"))
    live, saved = trained["model"], COPAModel.from_pretrained(tmp_path / "b" / "model").eval()
    assert live.vision.prefix_depth == saved.vision.prefix_depth == 1  # the trained model kept depth 2
    assert live.vision.keep_ratios == saved.vision.keep_ratios == [0.25]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = live.vision(x), saved.vision(x)
    assert torch.equal(a.kept, b.kept) and torch.allclose(a.tokens, b.tokens, atol=1e-6)


def test_set_selection_replaces_selectors_of_another_kind(micro_model):
    from copa.config import SelectConfig

    tpd = micro_model.vision.selectors[0]
    micro_model.set_selection(SelectConfig(selector="tpd", layers=[1], keep_ratios=[0.5], tpd_hidden=32))
    assert micro_model.vision.selectors[0] is tpd and micro_model.vision.prefix_depth == 1
    micro_model.set_selection(SelectConfig(selector="cls_attn", layers=[1, 3], keep_ratios=[0.5, 0.5]))
    assert len(micro_model.vision.selectors) == 2 and micro_model.cfg.select is micro_model.vision.select_cfg
    with pytest.raises(ValueError, match="select.layers"):
        micro_model.set_selection(SelectConfig(layers=[9], keep_ratios=[0.5]))


@pytest.mark.parametrize("selector", ["cls_attn", "text_attn", "tome"])
def test_attention_selectors_run_under_fsdp(synth_dir, tmp_path, selector):
    """A one-process FSDP group: parameters are DTensors, so a selector that reads a sharded block's
    weights outside FSDP's unshard fails exactly as with more processes; the loss must match."""
    import torch.distributed as dist

    from copa.train.loop import shard_fsdp
    from copa.train.trainer import validate

    cfg = train_config(
        synth_dir,
        "model.text.layers=1",
        f"model.select.selector={selector}",
        "model.select.keep_ratios=[0.25]",
    )
    batch = _batch(cfg, 4)
    torch.manual_seed(0)
    model = COPAModel(cfg.model).train()
    plain = PretrainObjective(copy.deepcopy(model), cfg.train.loss_weights)
    torch.manual_seed(1)
    ref = plain(batch)
    ref.loss.backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        obj = shard_fsdp(PretrainObjective(model, cfg.train.loss_weights))
        torch.manual_seed(1)
        out = obj(batch)
        out.loss.backward()
        grad = model.vision.blocks[2].attn.qkv.weight.grad.full_tensor()
        # validation's PTA metrics call the selector outside the objective's forward
        val = validate(obj, [batch], torch.device("cpu"), torch.float32)
    finally:
        dist.destroy_process_group()
    assert torch.equal(out.itm_kept, ref.itm_kept)
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    ref_grad = plain.model.vision.blocks[2].attn.qkv.weight.grad
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    assert all(math.isfinite(v) for k, v in val.items() if k.startswith("val_"))


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["cls_attn", "text_attn"])
def test_fsdp_two_processes_with_attention_selectors(synth_dir, tmp_path, selector):
    summary = _torchrun(
        tmp_path / selector,
        synth_dir,
        "train.distributed=fsdp",
        "train.steps=2",
        f"model.select.selector={selector}",
    )
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / selector / "model" / "model.safetensors").exists()

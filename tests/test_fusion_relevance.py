"""``model.fusion.relevance``: the fusion reads each kept patch's relevance by the model's own first
selector (standardised over the image's patches), whatever selects the patches; a fine-tune adds it
with ``train.fusion_relevance``; it survives saving, the frozen-feature cache and the export."""

from __future__ import annotations

import json

import pytest
import torch

from copa.cli import main
from copa.model.copa import COPAModel
from copa.model.feature_cache import FrozenFeatureCache
from tests.conftest import MICRO, TRAIN_MICRO, micro_config


def _inputs(model: COPAModel):
    torch.manual_seed(3)
    enc = model.tokenizer(
        ["the red circle", "is there a blue star?", "a cross"], padding=True, return_tensors="pt"
    )
    return torch.randn(3, 3, 32, 32), enc["input_ids"], enc["attention_mask"]


def _standardised_own_logits(model: COPAModel, images, ids, mask):
    with torch.no_grad():
        query = model.text_query(model.text_states(ids, mask), mask)
        z = model.selector_logits(model.image_prefix(images), query)
    return (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)


@pytest.fixture
def rel_model():
    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    assert model.add_fusion_relevance() and not model.add_fusion_relevance()
    return model


def test_relevance_is_the_own_selectors_whatever_selects(rel_model):
    images, ids, mask = _inputs(rel_model)
    want = _standardised_own_logits(rel_model, images, ids, mask)
    with torch.no_grad():
        own = rel_model(images, ids, mask).vision
        swapped = rel_model.with_selectors(rel_model.new_selectors("random"))(images, ids, mask).vision
        rel_model.set_keep_ratio(1.0)
        unpruned = rel_model(images, ids, mask).vision
    assert own.relevance.shape == (3, 8) and unpruned.relevance.shape == (3, 16)
    torch.testing.assert_close(own.relevance, want.gather(1, own.patch_index))
    assert not torch.equal(swapped.patch_index, own.patch_index)  # other patches, the same scores
    torch.testing.assert_close(swapped.relevance, want.gather(1, swapped.patch_index))
    torch.testing.assert_close(unpruned.relevance, want)
    # the own selector keeps its most relevant patches
    assert (own.relevance.min(1).values >= want.sort(1, descending=True).values[:, 7] - 1e-6).all()


def test_relevance_with_the_frozen_feature_cache_and_without_a_text(rel_model):
    images, ids, mask = _inputs(rel_model)
    rel_model.set_keep_ratio(1.0)
    rel_model.freeze(vit=True, selector=True)
    with torch.no_grad():
        plain = rel_model(images, ids, mask)
        rel_model.vision.use_feature_cache(FrozenFeatureCache(2**24))
        rel_model(images, ids, mask)  # fills the cache
        cached = rel_model(images, ids, mask)
        rel_model.vision.use_feature_cache(None)
        agnostic = rel_model.vision(images)
    torch.testing.assert_close(cached.vision.relevance, plain.vision.relevance)
    torch.testing.assert_close(cached.text, plain.text)
    assert agnostic.relevance is None


def test_the_fusion_reads_the_relevance(rel_model):
    """A relevance of 0 adds only the projection's bias (0 at the start): the fusion of a model without
    it; other relevances give the text other states."""
    from copa.model.fusion import FusionEncoder

    torch.manual_seed(0)
    img, txt, mask = torch.randn(2, 6, 64), torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.long)
    index = torch.tensor([[0, 5, 10, 15], [3, 6, 9, 12]])
    fusion = rel_model.fusion
    plain = FusionEncoder(2, 2, 64, 4, 128, 64, position=fusion.pos.proj.in_features).eval()
    plain.load_state_dict({k: v for k, v in fusion.state_dict().items() if not k.startswith("rel.")})
    with torch.no_grad():
        base = plain(img, txt, mask, index, 4)[1]
        zero = fusion(img, txt, mask, index, 4, torch.zeros(2, 4))[1]
        none = fusion(img, txt, mask, index, 4)[1]
        some = fusion(img, txt, mask, index, 4, torch.randn(2, 4))[1]
    torch.testing.assert_close(zero, base)
    torch.testing.assert_close(none, base)
    assert not torch.allclose(some, base, atol=1e-4)


def test_saved_with_relevance_loads_with_it(rel_model, tmp_path):
    images, ids, mask = _inputs(rel_model)
    rel_model.save_pretrained(tmp_path / "m")
    loaded = COPAModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg.fusion.relevance and loaded.vision.relevance
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids, mask).text, rel_model(images, ids, mask).text)
    # a model saved before the field: no relevance
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    del meta["model"]["fusion"]["relevance"]
    plain = COPAModel(micro_config().model)
    plain.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = COPAModel.from_pretrained(tmp_path / "old")
    assert not old.cfg.fusion.relevance and old.fusion.rel is None and not old.vision.relevance
    assert COPAModel.param_group("fusion.rel.weight") == "head"


def test_finetune_adds_and_trains_the_relevance(micro_init, synth_dir, tmp_path):
    from safetensors.torch import load_file

    sets = [
        *MICRO,
        *TRAIN_MICRO,
        f"data.train={synth_dir}/train.json",
        "train.steps=2",
        "train.freeze_vit=true",
        "train.fusion_relevance=true",
    ]
    argv = ["finetune", "vqa", "--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    assert (
        main([*argv, "--init", str(micro_init), "--eval-split", "none", "--out", str(tmp_path / "ft")]) == 0
    )
    cfg = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["model"]
    assert cfg["fusion"]["relevance"] is True and cfg["fusion"]["relevance_token"] is False
    weights = load_file(str(tmp_path / "ft" / "model" / "model.safetensors"))
    assert "fusion.rel.weight" in weights and weights["fusion.rel.bias"].abs().max() > 0  # trained from 0
    assert not any(k.startswith("fusion.pool.") for k in weights)
    # the relevance token too, on the model that has the relevance already
    argv = [*argv, "--set", "train.relevance_token=true"]
    init = tmp_path / "ft" / "model"
    assert main([*argv, "--init", str(init), "--eval-split", "none", "--out", str(tmp_path / "tok")]) == 0
    cfg = json.loads((tmp_path / "tok" / "model" / "config.json").read_text())["model"]
    assert cfg["fusion"]["relevance_token"] is True
    tok = load_file(str(tmp_path / "tok" / "model" / "model.safetensors"))
    assert tok["fusion.pool.kind"].abs().max() > 0 and tok["fusion.pool.scale"] != 2.0  # trained
    before = load_file(str(micro_init / "model.safetensors"))
    sel = [k for k in before if k.startswith("vision.selectors.")]
    assert sel and all(torch.equal(before[k], weights[k]) for k in sel)  # read, never trained by the task


def test_export_carries_the_relevance(rel_model, tmp_path):
    """vision_suffix outputs it and fusion takes it, ONNX Runtime equal to the eager model."""
    from copa.export import export_model, onnx_session

    report = export_model(rel_model, tmp_path, parts=("vision_suffix", "fusion"))
    assert report.parts["vision_suffix"]["outputs"] == ["tokens", "kept", "relevance"]
    assert "relevance" in report.parts["fusion"]["inputs"]
    assert report.worst <= 1e-4
    images, ids, mask = _inputs(rel_model)
    with torch.no_grad():
        txt = rel_model.text_states(ids, mask)
        prefix, query = rel_model.image_prefix(images), rel_model.text_query(txt, mask)
        want = rel_model(images, ids, mask)
    suffix = onnx_session(tmp_path / "vision_suffix.onnx")
    tokens, kept, rel = suffix.run(None, {"prefix": prefix.numpy(), "query": query.numpy()})
    fusion = onnx_session(tmp_path / "fusion.onnx")
    feed = {"tokens": tokens, "txt": txt.numpy(), "mask": mask.numpy(), "kept": kept, "relevance": rel}
    _, ft = fusion.run(None, feed)
    assert (torch.from_numpy(ft) - want.text).abs().max() <= 1e-4


def test_the_relevance_token_is_the_relevance_weighted_mean_of_the_kept_tokens(rel_model, tmp_path):
    from copa.model.fusion import RelevanceToken

    tokens, relevance = torch.randn(2, 5, 8), torch.randn(2, 5)
    pool = RelevanceToken(8)
    w = torch.softmax(2.0 * relevance, -1)
    torch.testing.assert_close(pool(tokens, relevance), (w.unsqueeze(-1) * tokens).sum(1, keepdim=True))
    sharp = torch.full((2, 5), -50.0)
    sharp[:, 3] = 50.0  # one patch the text names: its token
    torch.testing.assert_close(pool(tokens, sharp), tokens[:, 3:4])

    images, ids, mask = _inputs(rel_model)
    with torch.no_grad():
        before = rel_model(images, ids, mask)
    assert rel_model.add_fusion_relevance(token=True) and not rel_model.add_fusion_relevance(token=True)
    assert rel_model.cfg.fusion.relevance_token and COPAModel.param_group("fusion.pool.kind") == "head"
    with torch.no_grad():
        after = rel_model(images, ids, mask)
    assert after.image.shape[1] == before.image.shape[1] + 1  # one more visual token, the last
    assert not torch.allclose(after.text, before.text, atol=1e-5)  # the text reads it
    rel_model.save_pretrained(tmp_path / "m")
    loaded = COPAModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg.fusion.relevance_token and loaded.fusion.pool is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids, mask).text, after.text)
    from copa.export import export_model

    assert export_model(loaded, tmp_path / "onnx", parts=("vision_suffix", "fusion")).worst <= 1e-4


def test_the_relevance_token_needs_the_relevance():
    from copa.config import ConfigError, check_config
    from copa.model.fusion import FusionEncoder

    with pytest.raises(ValueError, match="relevance"):
        FusionEncoder(2, 2, 64, 4, 128, 64, relevance=False, relevance_token=True)
    with pytest.raises(ConfigError, match="relevance_token"):
        check_config(micro_config("model.fusion.relevance_token=true"))
    with pytest.raises(ConfigError, match="relevance_token"):
        check_config(micro_config("train.relevance_token=true"))
    check_config(micro_config("train.relevance_token=true", "train.fusion_relevance=true"))


def test_the_box_head_adds_the_relevance_weighted_per_expression(tmp_path):
    """``model.box_relevance``: the grounding scores are the plain head's plus the TPD's relevance of
    each kept patch, weighted 1 at the start; it survives saving and the export."""
    from copa.export import export_model, onnx_session

    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    images, ids, mask = _inputs(model)
    with torch.no_grad():
        plain = model.ground(model(images, ids, mask))
    assert model.add_box_relevance() and not model.add_box_relevance()
    assert model.cfg.box_relevance and model.vision.relevance and not model.cfg.fusion.relevance
    with torch.no_grad():
        fused = model(images, ids, mask)
        with_rel = model.ground(fused)
    want = _standardised_own_logits(model, images, ids, mask).gather(1, fused.vision.patch_index)
    torch.testing.assert_close(with_rel.scores, plain.scores + want)
    torch.testing.assert_close(with_rel.boxes, plain.boxes)  # the boxes are the plain head's
    assert COPAModel.param_group("box_head.prior.weight") == "head"

    model.save_pretrained(tmp_path / "m")
    loaded = COPAModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg.box_relevance and loaded.box_head.prior is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.ground(loaded(images, ids, mask)).scores, with_rel.scores)

    report = export_model(model, tmp_path / "x", parts=("vision_suffix", "heads"))
    assert report.parts["vision_suffix"]["outputs"] == ["tokens", "kept", "relevance"]
    assert "relevance" in report.parts["heads"]["inputs"] and report.worst <= 1e-4
    heads = onnx_session(tmp_path / "x" / "heads.onnx")
    feed = {
        "fused_image": fused.image.numpy(),
        "fused_cls": fused.text[:, 0].contiguous().numpy(),
        "kept": fused.vision.patch_index.numpy(),
        "relevance": fused.vision.relevance.numpy(),
    }
    _, _, scores = heads.run(None, feed)
    assert (torch.from_numpy(scores) - with_rel.scores).abs().max() <= 1e-4


def test_finetune_adds_and_trains_the_box_relevance(micro_init, synth_dir, tmp_path):
    from safetensors.torch import load_file

    sets = [*MICRO, *TRAIN_MICRO, f"data.train={synth_dir}/train.json", "train.steps=2"]
    sets += ["train.freeze_vit=true", "train.box_relevance=true"]
    argv = [
        "finetune",
        "grounding",
        "--config",
        "configs/tiny.yaml",
        *[a for s in sets for a in ("--set", s)],
    ]
    assert main([*argv, "--init", str(micro_init), "--eval-split", "none", "--out", str(tmp_path / "g")]) == 0
    cfg = json.loads((tmp_path / "g" / "model" / "config.json").read_text())["model"]
    assert cfg["box_relevance"] is True and cfg["fusion"]["relevance"] is False
    weights = load_file(str(tmp_path / "g" / "model" / "model.safetensors"))
    assert weights["box_head.prior.bias"].item() != 1.0  # trained from 1

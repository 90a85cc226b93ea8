"""The frozen-ViT feature cache (``copa.model.feature_cache``): a hit returns what the ViT computes,
the training it serves is the one without it, and it refuses or bypasses a ViT that is not fixed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from copa.cli import main
from copa.model.copa import COPAModel
from copa.model.feature_cache import FrozenFeatureCache, row_keys
from tests.conftest import micro_config
from tests.test_tasks import _sets


def _frozen(*overrides: str) -> COPAModel:
    torch.manual_seed(0)
    model = COPAModel(micro_config(*overrides).model)
    model.freeze(vit=True, selector=True)
    return model.train()


def _pairs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)[torch.arange(n) % 3]  # each image twice
    ids = torch.randint(1, 100, (n, 7), generator=g)
    return images, ids, torch.ones_like(ids)


def test_keys_tell_images_apart_and_match_copies():
    x = torch.randn(3, 3, 8, 8)
    keys = row_keys(torch.cat([x, x.clone()]), "prefix")
    assert keys[:3] == keys[3:] and len(set(keys[:3])) == 3
    assert row_keys(x, "tokens") != row_keys(x, "prefix")
    y = x.clone()
    y[1, 0, 0, 0] += 1e-6
    assert row_keys(y, "prefix")[1] != keys[1]


def test_lookup_computes_only_unseen_images_and_respects_the_cap():
    calls: list[int] = []

    def compute(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True) * torch.ones(x.shape[0], 4)

    x = torch.randn(4, 3, 8, 8)
    cache = FrozenFeatureCache(max_bytes=2**20)
    first = cache.lookup("k", x, compute)
    again = cache.lookup("k", torch.cat([x[2:], torch.randn(1, 3, 8, 8)]), compute)
    assert calls == [4, 1]
    assert torch.equal(again[:2], first[2:]) and torch.equal(first, compute(x))
    assert cache.stats.as_dict()["hits"] == 2 and cache.stats.misses == 5 and cache.stats.entries == 5
    tiny = FrozenFeatureCache(max_bytes=2 * 4 * 4)  # room for two rows of four floats
    out = tiny.lookup("k", x, compute)
    assert torch.equal(out, compute(x)) and tiny.stats.entries == 2 and tiny.stats.skipped == 2
    with pytest.raises(ValueError):
        FrozenFeatureCache(0)


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_cached_forward_and_gradients_equal_the_uncached(keep):
    """Pruned, the prefix is cached (the selection still reads the text); unpruned, every token."""
    images, ids, mask = _pairs()
    losses, grads = [], []
    for cache in (None, FrozenFeatureCache(2**24)):
        model = _frozen()
        model.set_keep_ratio(keep)
        model.use_feature_cache(cache)
        for _ in range(2):  # the second pass is served from the cache
            model.zero_grad()
            out = model.ground(model(images, ids, mask))
            loss = out.scores.logsumexp(1).mean() + out.boxes.square().mean()
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if cache is not None:
            assert cache.stats.hits == 3 + 6 and cache.stats.misses == 3  # 3 distinct images, each twice
            kinds = {k.split(b"|")[0] for k in cache.store}
            assert kinds == ({b"tokens"} if keep == 1.0 else {b"prefix2"})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_trainable_encoder_is_not_cached_and_stochastic_depth_bypasses_it():
    model = COPAModel(micro_config().model)
    model.use_feature_cache(FrozenFeatureCache(2**20))  # nothing frozen: nothing served from it
    assert model.vision.feature_cache is None and model.text.feature_cache is None
    with pytest.raises(ValueError, match="frozen"):
        model.vision.use_feature_cache(FrozenFeatureCache(2**20))
    model = _frozen("model.vision.drop_path=0.2")
    cache = FrozenFeatureCache(2**20)
    model.use_feature_cache(cache)
    images, ids, mask = _pairs()
    model(images, ids, mask)
    assert cache.stats.misses == 0 and not cache.store  # training mode draws the drop-path anew
    model.eval()
    model(images, ids, mask)
    assert cache.stats.misses == 3 and cache.stats.hits == 3 and len(cache.store) == 3


@pytest.mark.parametrize("task", ["grounding", "vqa"])
def test_finetune_with_the_cache_trains_as_without_it(micro_init, synth_dir, tmp_path, task):
    from safetensors.torch import load_file

    weights, summaries = [], []
    for mb in (0, 64):
        out = tmp_path / f"mb{mb}"
        sets = _sets(synth_dir, "train.steps=6", "train.freeze_vit=true", f"train.feature_cache_mb={mb}")
        args = ["finetune", task, "--config", "configs/tiny.yaml", *sets, "--init", str(micro_init)]
        assert main([*args, "--eval-split", "none", "--out", str(out)]) == 0
        weights.append(load_file(str(out / "model" / "model.safetensors")))
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert summaries[0]["feature_cache"] is None
    stats = summaries[1]["feature_cache"]
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["entries"] == stats["misses"]
    torch.testing.assert_close(summaries[0]["last_loss"], summaries[1]["last_loss"], rtol=1e-4, atol=1e-5)
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_frozen_text_encoder_caches_its_states_exactly():
    """Token rows repeat (the same question or expression on another image); the padding is part of
    the key. A text encoder with any trainable layer computes as always."""
    images, ids, mask = _pairs()
    ids[3:] = ids[:3]  # every text twice, each time with another image
    mask[:, -2:] = torch.tensor([1, 0])  # padded rows
    losses = []
    for cache in (None, FrozenFeatureCache(2**24)):
        model = _frozen()
        model.text.freeze(-1)
        model.use_feature_cache(cache)
        out = model.ground(model(images, ids, mask))
        losses.append(out.scores.logsumexp(1).mean() + out.boxes.square().mean())
        if cache is not None:
            texts = [k for k in cache.store if k.startswith(b"text")]
            assert len(texts) == 3 and cache.stats.hits == 3 + 3  # 3 repeated texts, 3 repeated images
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    model = _frozen("model.text.layers=2", "train.freeze_text_layers=1")
    model.text.freeze(1)  # the top layer still trains
    cache = FrozenFeatureCache(2**24)
    model.use_feature_cache(cache)
    assert model.text.feature_cache is None and model.vision.feature_cache is cache
    with pytest.raises(ValueError, match="frozen"):
        model.text.use_feature_cache(cache)


@pytest.mark.parametrize("task", ["grounding", "vqa"])
def test_evaluation_with_the_cache_predicts_as_without_it(micro_init, synth_dir, tmp_path, task):
    """``eval.feature_cache_mb``: an unfrozen model evaluated with the cache gives the same predictions
    (each image's prefix reused across its questions) and reports the cache's hits."""
    preds = []
    for mb in (0, 64):
        out = tmp_path / f"mb{mb}"
        sets = _sets(synth_dir, f"eval.feature_cache_mb={mb}")
        args = ["evaluate", task, "--config", "configs/tiny.yaml", *sets, "--ckpt", str(micro_init)]
        assert main([*args, "--split", "test", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        preds.append([json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()])
        if mb:  # the process's cache: entries of earlier evaluations of these weights stay
            stats = metrics["feature_cache"]
            assert stats["hits"] > 0 and 0 < stats["misses"] <= stats["entries"]
        else:
            assert "feature_cache" not in metrics
    assert len(preds[0]) == len(preds[1]) > 0
    for a, b in zip(*preds, strict=True):
        if task == "vqa":
            assert a == b
        else:
            assert a["index"] == b["index"]
            b_pred = torch.tensor(b["box_pred_cxcywh"])
            torch.testing.assert_close(torch.tensor(a["box_pred_cxcywh"]), b_pred, rtol=1e-4, atol=1e-5)


def test_the_evaluation_cache_serves_a_trainable_model_in_eval_mode_and_restores_what_was_there():
    torch.manual_seed(0)
    model = COPAModel(micro_config().model)  # nothing frozen: training could not cache it
    images, ids, mask = _pairs()
    with pytest.raises(ValueError, match="eval mode"), model.evaluation_cache(FrozenFeatureCache(2**20)):
        pass
    model.eval()
    with torch.no_grad():
        plain = model.ground(model(images, ids, mask)).boxes
        cache = FrozenFeatureCache(2**24)
        with model.evaluation_cache(cache):
            assert model.vision.feature_cache is cache and model.text.feature_cache is cache
            cached = model.ground(model(images, ids, mask)).boxes
    assert cache.stats.hits == 3 and cache.stats.misses == 3 + 6  # 3 images twice, 6 distinct texts
    torch.testing.assert_close(plain, cached, rtol=1e-5, atol=1e-6)
    assert model.vision.feature_cache is None and model.text.feature_cache is None


def test_a_shared_evaluation_cache_serves_only_the_weights_that_computed_each_entry():
    """``COPAModel.evaluation_cache`` scopes keys by a fingerprint of each encoder's weights: a second
    evaluation of the same weights (another selector) reuses everything, one whose ViT prefix
    changed recomputes the images (and still reuses the texts), and each gets its uncached outputs."""
    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    images, ids, mask = _pairs()
    cache = FrozenFeatureCache(2**24)

    def run() -> tuple[torch.Tensor, int, int]:
        before = dataclasses.replace(cache.stats)
        with torch.no_grad(), model.evaluation_cache(cache):
            boxes = model.ground(model(images, ids, mask)).boxes
        delta = cache.stats.since(before)
        return boxes, delta.hits, delta.misses

    with torch.no_grad():
        plain = model.ground(model(images, ids, mask)).boxes
    first, _, misses = run()
    assert misses == 3 + 6  # 3 distinct images, 6 distinct texts
    again, hits, misses = run()
    assert (hits, misses) == (12, 0)
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a selector's weights do not change the prefix: still all hits
        next(model.vision.selectors.parameters()).add_(0.5)
    _, hits, misses = run()
    assert (hits, misses) == (12, 0)
    with torch.no_grad():  # the patch embedding does: the images are computed anew
        next(model.vision.patch_embed.parameters()).add_(0.5)
        changed = model.ground(model(images, ids, mask)).boxes
    out, hits, misses = run()
    assert misses == 3 and hits == 6 + 3  # new prefixes (each image twice); the texts reused
    torch.testing.assert_close(out, changed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed, plain)
    # unpruned, the whole encoder's tokens are cached: a change after the prefix recomputes them too
    model.set_keep_ratio(1.0)
    with torch.no_grad():
        run()
        model.vision.norm.weight.mul_(2.0)
        unpruned = model.ground(model(images, ids, mask)).boxes
    out, hits, misses = run()
    assert misses == 3 and hits == 6 + 3
    torch.testing.assert_close(out, unpruned, rtol=1e-5, atol=1e-6)


def test_the_weights_fingerprint_sees_parameters_and_buffers():
    from copa.model.feature_cache import weights_fingerprint

    bn = torch.nn.BatchNorm1d(4)
    fp = weights_fingerprint(bn)
    assert weights_fingerprint(torch.nn.BatchNorm1d(4)) == fp
    bn.running_mean += 1.0
    assert weights_fingerprint(bn) != fp
    assert weights_fingerprint(bn, skip=("running_mean",)) == weights_fingerprint(
        torch.nn.BatchNorm1d(4), skip=("running_mean",)
    )


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_a_tuned_vit_suffix_trains_after_the_selection_and_the_prefix_stays_cached(keep):
    """``freeze(vit=True, tune_vit_suffix=True)``: only the blocks after the first selection and the final
    norm train; the prefix is still served from the cache with the same loss and gradients, and the
    unpruned output tokens, which the trained blocks compute, are not cached in training."""
    images, ids, mask = _pairs()
    losses, grads = [], []
    for cache in (None, FrozenFeatureCache(2**24)):
        torch.manual_seed(0)
        model = COPAModel(micro_config().model)
        model.freeze(vit=True, selector=True, tune_vit_suffix=True)
        vit = model.vision
        assert vit.prefix_frozen and not vit.backbone_frozen
        trained = {n for n, p in vit.named_parameters() if p.requires_grad}
        assert trained and all(n.startswith(("blocks.2.", "blocks.3.", "norm.")) for n in trained)
        assert any(n.startswith("blocks.2.") for n in trained) and "norm.weight" in trained
        model.train().set_keep_ratio(keep)
        model.use_feature_cache(cache)
        for _ in range(2):
            model.zero_grad()
            out = model.ground(model(images, ids, mask))
            loss = out.scores.logsumexp(1).mean() + out.boxes.square().mean()
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert any(n.startswith("vision.blocks.3.") for n in grads[-1])
        assert not any(n.startswith(("vision.blocks.0.", "vision.patch_embed")) for n in grads[-1])
        if cache is not None:
            assert {k.split(b"|")[0] for k in cache.store} == {b"prefix2"}
            assert cache.stats.hits == 3 + 6 and cache.stats.misses == 3
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_models_that_differ_after_the_selection_share_their_evaluation_prefixes():
    """A tuned suffix changes the tokens but not the prefix: a shared evaluation cache serves the
    prefix to both models, and each still gets its own uncached outputs."""
    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    images, ids, mask = _pairs()
    cache = FrozenFeatureCache(2**24)
    with torch.no_grad(), model.evaluation_cache(cache):
        model(images, ids, mask)
    with torch.no_grad():
        model.vision.blocks[3].mlp.fc2.bias.add_(0.5)
        plain = model.ground(model(images, ids, mask)).boxes
    before = dataclasses.replace(cache.stats)
    with torch.no_grad(), model.evaluation_cache(cache):
        served = model.ground(model(images, ids, mask)).boxes
    delta = cache.stats.since(before)
    assert (delta.hits, delta.misses) == (6 + 6, 0)  # every prefix (each image twice) and text reused
    torch.testing.assert_close(served, plain, rtol=1e-5, atol=1e-6)


def test_a_finetune_that_tunes_the_vit_suffix_leaves_the_prefix_as_it_was(micro_init, synth_dir, tmp_path):
    from safetensors.torch import load_file

    sets = _sets(
        synth_dir,
        "train.steps=4",
        "train.freeze_vit=true",
        "train.tune_vit_suffix=true",
        "train.feature_cache_mb=64",
    )
    args = ["finetune", "vqa", "--config", "configs/tiny.yaml", *sets, "--init", str(micro_init)]
    assert main([*args, "--eval-split", "none", "--out", str(tmp_path / "ft")]) == 0
    before = load_file(str(micro_init / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model" / "model.safetensors"))
    vit = [n for n in before if n.startswith("vision.") and not n.startswith("vision.selectors.")]
    changed = {n for n in vit if not torch.equal(before[n], after[n])}
    assert changed and all(
        n.startswith(("vision.blocks.2.", "vision.blocks.3.", "vision.norm.")) for n in changed
    )
    stats = json.loads((tmp_path / "ft" / "summary.json").read_text())["feature_cache"]
    assert stats["hits"] > 0 and stats["misses"] > 0  # the frozen prefix still served from the cache

"""Model invariants from issue 2: exact unpruned equivalence, top-K selection, shared-prefix API,
gradient flow into the TPD, save/load, decoder cache, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from copa.model.copa import COPAModel, load
from copa.model.selection import num_keep, select_and_fuse
from copa.model.vit import VisionTransformer
from tests.conftest import micro_config


def _texts(model: COPAModel, texts: list[str]):
    b = model.tokenizer(texts, padding=True, return_tensors="pt")
    return b.input_ids, b.attention_mask


def _vit(selector: str, keep: float, layers=(2,)) -> VisionTransformer:
    cfg = micro_config(
        f"model.select.selector={selector}",
        f"model.select.keep_ratios={[keep] * len(layers)}",
        f"model.select.layers={list(layers)}",
    ).model
    torch.manual_seed(0)
    return VisionTransformer(cfg.vision, cfg.select, text_dim=cfg.text.width).eval()


@pytest.mark.parametrize("selector", ["tpd", "text_attn", "cls_attn"])
def test_keep_ratio_one_and_none_equal_unpruned(selector):
    torch.manual_seed(1)
    images, query = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    ref = _vit("none", 1.0)
    full = _vit(selector, 1.0)
    full.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():
        a = ref(images).tokens
        b = full(images, query).tokens
        c = full(images, query, keep_ratios=[1.0]).tokens
        manual = ref.norm(ref._run(ref.embed(images), 0, len(ref.blocks)))
    assert a.shape == (3, 1 + 16, 64)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, manual)
    assert ref(images, query, keep_ratios=[0.25]).tokens.shape[1] == 17  # `none` ignores ratios


@pytest.mark.parametrize("selector", ["tpd", "text_attn", "cls_attn"])
def test_kept_tokens_are_topk_and_fused_weights_sum_to_one(selector):
    vit = _vit(selector, 0.3)
    images, query = torch.randn(4, 3, 32, 32), torch.randn(4, 64)
    with torch.no_grad():
        prefix = vit.forward_prefix(images)
        out = vit.forward_suffix(prefix, query)
    k = num_keep(16, 0.3)
    assert k == 5 and out.tokens.shape == (4, k + 2, 64)
    sel = out.selections[0]
    expected = sel.logits.topk(k, dim=1).indices
    assert torch.equal(sel.kept.sort(1).values, expected.sort(1).values)
    assert torch.allclose(sel.fuse_weights.sum(1), torch.ones(4), atol=1e-6)
    assert (sel.fuse_weights >= 0).all()


def test_select_and_fuse_by_hand():
    x = torch.arange(1 + 4, dtype=torch.float32).view(1, 5, 1).repeat(1, 1, 2)  # cls=0, patches 1..4
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out, order, w = select_and_fuse(x, logits, k=2)
    assert order[0, :2].tolist() == [1, 3]
    assert out[0, :, 0].tolist()[:3] == [0.0, 2.0, 4.0]  # cls, patch 1 (value 2), patch 3 (value 4)
    p = torch.tensor([1.0, 0.0]).softmax(0)  # dropped patches 2 (logit 1) and 0 (logit 0)
    assert out[0, 3, 0].item() == pytest.approx(p[0] * 3.0 + p[1] * 1.0)
    assert w.sum().item() == pytest.approx(1.0)


def test_two_stage_selection_shapes_and_indices():
    vit = _vit("tpd", 0.5, layers=(1, 3))
    out = vit(torch.randn(2, 3, 32, 32), torch.randn(2, 64))
    assert out.tokens.shape == (2, 1 + 4 + 1, 64)  # 16 -> 8 -> 4 kept, one fused token
    first, second = out.selections
    # the second stage's candidates are the first stage's survivors, as original patch indices
    assert torch.equal(second.candidates, first.kept)
    assert set(out.kept[0].tolist()) <= set(first.kept[0].tolist())


def test_two_call_api_equals_one_call_and_prefix_serves_many_texts(micro_model):
    m = micro_model
    images = torch.randn(2, 3, 32, 32)
    texts = ["a red circle", "a blue star on the left", "two green squares", "nothing here"]
    ids, mask = _texts(m, texts)
    with torch.no_grad():
        txt = m.text_states(ids, mask)
        prefix = m.image_prefix(images)  # computed once for both images
        pair_img = torch.tensor([0, 0, 1, 1])  # image 0 with texts 0,1; image 1 with texts 2,3
        shared = m.fuse(m.image_tokens(prefix[pair_img], m.text_query(txt, mask)), txt, mask)
        single = m(images[pair_img], ids, mask)
    assert torch.allclose(shared.text, single.text, atol=1e-5)
    assert torch.allclose(shared.image, single.image, atol=1e-5)
    assert torch.equal(shared.vision.kept, single.vision.kept)
    # different queries on the same prefix choose different patches (the selection is text-aware);
    # random queries, because an untrained text encoder maps all short texts to nearly one [CLS]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = torch.randn(4, 64, generator=g) * 10
        kept = m.image_tokens(prefix[[0, 0, 0, 0]], q).kept.sort(1).values
    assert len({tuple(k.tolist()) for k in kept}) > 1


def test_gradient_reaches_tpd(micro_model):
    m = micro_model.train()
    ids, mask = _texts(m, ["a red circle", "a blue star"])
    out = m(torch.randn(2, 3, 32, 32), ids, mask)
    out.cls.pow(2).sum().backward()
    tpd = m.vision.selectors[0]
    for name, p in tpd.named_parameters():
        if name in ("agnostic_query", "fc_out.bias"):
            continue  # unused with a text; a shift the fused-token softmax cannot see (PTA trains it)
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_agnostic_query_is_learned(micro_model):
    m = micro_model.train()
    emb = m.encode_image(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb.sum().backward()
    assert m.vision.selectors[0].agnostic_query.grad.abs().sum() > 0


def test_save_load_round_trip(micro_model, tmp_path):
    m = micro_model
    ids, mask = _texts(m, ["a red circle"])
    images = torch.randn(1, 3, 32, 32)
    m.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "config.json").exists()
    m2 = load(tmp_path / "ckpt")
    with torch.no_grad():
        a, b = m(images, ids, mask), m2(images, ids, mask)
    assert torch.equal(a.text, b.text) and torch.equal(a.image, b.image)
    assert (
        m2.cfg == m.cfg.__class__(**{**m.cfg.__dict__, "text": m2.cfg.text})
        and m2.tokenizer.vocab_size == 30522
    )
    # tied heads survive the round trip
    assert m2.lm_head._embedding[0] is m2.text.word_embeddings


def test_load_skips_random_init_and_matches_a_full_build(micro_model, tmp_path):
    """``from_pretrained`` builds without drawing initial weights: every parameter and buffer (the
    non-persistent ones included: position ids, the output vocabulary) equals a normally built model
    that loaded the same file, and torch's initialisers work again after."""
    from copa.model.copa import load_weights, read_model_config

    micro_model.set_output_vocab([0, 5, 101, 102])
    micro_model.save_pretrained(tmp_path / "ckpt")
    fast = load(tmp_path / "ckpt")
    cfg = read_model_config(tmp_path / "ckpt")
    cfg.text.tokenizer = str(tmp_path / "ckpt")
    full = COPAModel(cfg, load_text_weights=False)
    assert not load_weights(full, tmp_path / "ckpt" / "model.safetensors", strict=False)[0]
    got = {**dict(fast.named_parameters()), **dict(fast.named_buffers())}
    want = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    assert got.keys() == want.keys() and "text.bert.embeddings.position_ids" in got
    assert [k for k in got if not torch.equal(got[k], want[k])] == []
    assert fast.lm_head.vocab.tolist() == [0, 5, 101, 102]
    assert torch.nn.Linear(64, 64).weight.std() > 0.01  # the initialisers are back


def test_load_rejects_a_checkpoint_missing_a_weight(micro_model, tmp_path):
    """Built without initial weights, a model whose file lacks one would hold garbage there: an error."""
    from safetensors.torch import load_file, save_file

    from copa.errors import CheckpointError

    micro_model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(weights))
    del state["decoder.layers.0.attn.query.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="missing="):
        load(tmp_path / "ckpt")


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a COPA checkpoint"):
        load(tmp_path)


def test_decoder_cache_matches_full_pass(micro_model):
    m = micro_model
    ids, mask = _texts(m, ["a red circle left of a star", "two cubes"])
    with torch.no_grad():
        fused = m(torch.randn(2, 3, 32, 32), ids, mask)
        ctx, cmask = fused.context()
        dec_ids = ids[:, :5]
        full = m.decode(dec_ids, None, ctx, cmask)
        cache = m.new_decoder_cache()
        steps = [m.decode(dec_ids[:, :2], None, ctx, cmask, cache=cache, start=0)]
        for t in range(2, 5):
            steps.append(m.decode(dec_ids[:, t : t + 1], None, ctx, cmask, cache=cache, start=t))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_greedy_and_beam_search_run(micro_model):
    from copa.model.decoder import beam_search, greedy_search

    m = micro_model
    ids, mask = _texts(m, ["a red circle", "a star"])
    with torch.no_grad():
        ctx, cmask = m(torch.randn(2, 3, 32, 32), ids, mask).context()
    tok = m.tokenizer

    def make_step(ctx, cmask):
        def step(tokens, cache, start):
            h = m.decode(tokens, None, ctx, cmask, cache=cache, start=start)
            return m.lm_logits(h[:, -1])

        return step

    bos = torch.full((2, 1), tok.cls_token_id)
    g = greedy_search(make_step(ctx, cmask), m.new_decoder_cache(), bos, 6, tok.sep_token_id)
    assert g.tokens.shape[0] == 2 and g.tokens.shape[1] <= 6
    beam = 3
    bctx, bmask = ctx.repeat_interleave(beam, 0), cmask.repeat_interleave(beam, 0)
    r = beam_search(
        make_step(bctx, bmask),
        m.new_decoder_cache(),
        bos.repeat_interleave(beam, 0),
        6,
        tok.sep_token_id,
        beam=beam,
    )
    assert r.tokens.shape[0] == 2
    # beam search finds a sequence at least as likely as greedy (length penalty 0 = raw log-prob)
    r0 = beam_search(
        make_step(bctx, bmask),
        m.new_decoder_cache(),
        bos.repeat_interleave(beam, 0),
        6,
        tok.sep_token_id,
        beam=beam,
        length_penalty=0.0,
    )
    assert (r0.scores >= g.scores - 1e-4).all()


def test_fusion_connected_layer_updates_image_stream(micro_model):
    m = micro_model
    assert m.fusion.connected == [False, True]
    img, txt, mask = torch.randn(2, 5, 64), torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.long)
    index = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    with torch.no_grad():
        out_img, _out_txt = m.fusion(img, txt, mask, index, 2)
    assert out_img.shape == img.shape and not torch.allclose(out_img, img)


def test_fusion_reads_where_each_patch_is(micro_model):
    """The same tokens at other places give the text other states; a token moved together with its
    place changes nothing but the order of the image outputs; without positions the places are not
    read (the fusion of models saved before ``model.fusion.position``)."""
    from copa.model.fusion import FusionEncoder

    fusion = micro_model.fusion
    assert fusion.pos is not None
    torch.manual_seed(0)
    img, txt, mask = torch.randn(2, 6, 64), torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.long)
    index = torch.tensor([[0, 5, 10, 15], [3, 6, 9, 12]])  # K = 4 of a 4 x 4 grid; token 5 is a fused one
    with torch.no_grad():
        out_img, out_txt = fusion(img, txt, mask, index, 4)
        perm = torch.tensor([0, 3, 1, 4, 2, 5])  # CLS and the fused token stay where they are
        p_img, p_txt = fusion(img[:, perm], txt, mask, index[:, perm[1:5] - 1], 4)
        _, moved_txt = fusion(img, txt, mask, index.flip(1), 4)
        torch.manual_seed(1)
        plain = FusionEncoder(2, 2, 64, 4, 128, 64, position=0).eval()
        a = plain(img, txt, mask, index, 4)[1]
        b = plain(img, txt, mask, index.flip(1), 4)[1]
    torch.testing.assert_close(p_img, out_img[:, perm])
    torch.testing.assert_close(p_txt, out_txt)
    assert not torch.allclose(moved_txt, out_txt, atol=1e-4)
    assert plain.pos is None
    torch.testing.assert_close(a, b)


def test_models_saved_before_fusion_position_load_without_it(tmp_path):
    import json

    from copa.config import ConfigError, check_model_config
    from tests.conftest import micro_config

    torch.manual_seed(0)
    COPAModel(micro_config("model.fusion.position=0").model).save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["fusion"]["position"]  # as written before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = COPAModel.from_pretrained(tmp_path / "old")
    assert loaded.cfg.fusion.position == 0 and loaded.fusion.pos is None
    assert COPAModel(micro_config().model).cfg.fusion.position == 24
    assert COPAModel.param_group("fusion.pos.proj.weight") == "head"
    with pytest.raises(ConfigError, match="fusion.position"):
        check_model_config(micro_config("model.fusion.position=6").model)


def test_base_parameter_counts():
    from copa.config import load_config

    cfg = load_config("configs/base.yaml")
    with torch.device("meta"):
        m = COPAModel(cfg.model, load_text_weights=False)
    counts = m.num_parameters()
    assert math.isclose(counts["vision"], 85.8e6, rel_tol=0.01)  # ViT-B/16 at 256 px, no classifier
    assert math.isclose(counts["text"], 66.4e6, rel_tol=0.01)  # BERT-base embeddings + 6 layers
    assert 300e6 < counts["total"] < 340e6


def test_text_query_pooling(micro_model):
    m = micro_model
    txt = torch.randn(2, 4, 64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    m.cfg.text.pooling = "mean"
    q = m.text_query(txt, mask)
    assert torch.allclose(q[0], txt[0, :2].mean(0)) and torch.allclose(q[1], txt[1].mean(0))
    m.cfg.text.pooling = "cls"
    assert torch.equal(m.text_query(txt, mask), txt[:, 0])
    m.cfg.text.pooling = "max"
    with pytest.raises(ValueError, match="pooling"):
        m.text_query(txt, mask)
    m.cfg.text.pooling = "mean"


def test_selector_logits_are_the_first_stage_of_the_forward(micro_model):
    """``selector_logits`` (what PTA trains) is exactly what the first selection stage ranks."""
    m = micro_model
    with torch.no_grad():
        prefix = m.image_prefix(torch.randn(2, 3, 32, 32))
        q = torch.randn(2, 64)
        first = m.image_tokens(prefix, q).selections[0].logits
        assert torch.equal(m.selector_logits(prefix, q), first)
    assert m.has_selectors and len(m.selector_parameters()) > 0


def test_selection_swap_is_restored_and_views_leave_the_model_alone(micro_model):
    m = micro_model
    with torch.no_grad():
        prefix = m.image_prefix(torch.randn(2, 3, 32, 32))
        before = m.image_tokens(prefix).tokens
        ratios = m.keep_ratios
        with m.selecting_with(m.new_selectors("none")):
            assert not m.has_selectors and not m.pruning
            assert m.image_tokens(prefix).tokens.shape[1] == 1 + m.num_patches
        assert m.keep_ratios == ratios and m.pruning
        assert torch.equal(m.image_tokens(prefix).tokens, before)
        view = m.with_selectors(m.new_selectors("random"))
        assert view.image_tokens(prefix).tokens.shape == before.shape
        assert torch.equal(m.image_tokens(prefix).tokens, before)  # the model keeps its own selectors


def test_swapped_in_selectors_do_not_depend_on_the_global_rng():
    """A selector swapped in for an ablation stays untrained (text_attn's projection when the text
    and ViT widths differ): its weights must be the same in every process, or so are not the
    ablation's numbers."""
    model = COPAModel(micro_config("model.text.width=48", "model.text.heads=4").model)
    torch.manual_seed(1)
    a = model.new_selectors("text_attn")
    torch.manual_seed(2)
    b = model.new_selectors("text_attn")
    wa, wb = (dict(m.named_parameters()) for m in (a, b))
    assert wa and all(torch.equal(v, wb[k]) for k, v in wa.items())
    assert all(v.std() > 0 for k, v in wa.items() if k.endswith("weight"))

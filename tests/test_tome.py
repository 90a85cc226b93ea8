"""``tome``: ToMe-style bipartite soft matching behind the selector interface (issue 13 item 1)."""

from __future__ import annotations

import pytest
import torch

from copa.model.layers import ViTBlock
from copa.model.selection import TokenMerging, bipartite_merge_plan, make_selector, merge_tokens, num_keep
from copa.model.vit import VisionTransformer
from tests.conftest import MICRO, micro_config


def _vit(selector: str, keep: float, layers=(2,), *extra: str) -> VisionTransformer:
    cfg = micro_config(
        f"model.select.selector={selector}",
        f"model.select.layers={list(layers)}",
        f"model.select.keep_ratios={[keep] * len(layers)}",
        *extra,
    ).model
    torch.manual_seed(0)
    return VisionTransformer(cfg.vision, cfg.select, text_dim=cfg.text.width).eval()


def _block(dim: int = 16) -> ViTBlock:
    torch.manual_seed(0)
    return ViTBlock(dim, 4).eval()


def test_make_selector_and_config_accept_tome():
    assert isinstance(make_selector("tome", 8, 8, 8), TokenMerging)
    assert micro_config("model.select.selector=tome").model.select.selector == "tome"
    assert not list(TokenMerging().parameters())


@pytest.mark.parametrize(("n", "target"), [(16, 1), (16, 3), (16, 8), (16, 9), (16, 16), (15, 4), (7, 6)])
def test_merge_plan_groups_and_nested_ranking(n, target):
    torch.manual_seed(n + target)
    metric, sizes = torch.randn(3, n, 8), torch.ones(3, n)
    rank, group, rep = bipartite_merge_plan(metric, sizes, target)
    assert rank.shape == group.shape == (3, n) and rep.shape == (3, target)
    # every output token is the group of its representative, and every group is non-empty
    assert torch.equal(group.gather(1, rep), torch.arange(target).expand(3, target))
    assert all(row.unique().numel() == target for row in group)
    # the representatives of a merge to `target` are exactly the top-`target` by rank, best first
    assert torch.equal(rep, rank.topk(target, dim=1).indices)
    assert torch.equal(rank.argsort(1), bipartite_merge_plan(metric, sizes, 1)[0].argsort(1))


def test_merge_plan_rejects_bad_target():
    with pytest.raises(ValueError, match="merge target"):
        bipartite_merge_plan(torch.randn(1, 4, 2), torch.ones(1, 4), 0)


def test_identical_tokens_merge_exactly():
    """Pairs of identical patches (adjacent, so in opposite bipartite sets): merging 2M -> M gives
    back each distinct patch bit for bit, with size 2."""
    torch.manual_seed(0)
    distinct = torch.randn(2, 6, 16) * 3
    patches = distinct.repeat_interleave(2, dim=1)  # (2, 12, 16): v0 v0 v1 v1 ...
    x = torch.cat([torch.randn(2, 1, 16), patches], dim=1)
    out, _, _, sizes = TokenMerging().merge(x, _block(), k=6, fuse=False)
    assert out.shape == (2, 1 + 6, 16) and torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(sizes, torch.full((2, 6), 2.0))
    for b in range(2):
        got = {tuple(t.tolist()) for t in out[b, 1:]}
        assert got == {tuple(t.tolist()) for t in distinct[b]}  # exact, no rounding
    # identical tokens over several rounds (groups of 4 and sizes other than 1) are exact too
    x4 = torch.cat([torch.randn(1, 1, 16), distinct[:1, :2].repeat_interleave(4, dim=1)], dim=1)
    out4, _, _, s4 = TokenMerging().merge(x4, _block(), k=2, fuse=False)
    assert {tuple(t.tolist()) for t in out4[0, 1:]} == {tuple(t.tolist()) for t in distinct[0, :2]}
    assert s4.sum().item() == 8


def test_merged_tokens_are_size_weighted_means():
    """Over several rounds a token is merged again and again: with size weighting it is the plain
    mean of all its original patches (unweighted averaging of averages would not be)."""
    torch.manual_seed(1)
    n, d = 24, 16
    x = torch.randn(2, 1 + n, d)
    sel = TokenMerging()
    metric = sel.metric(x[:, 1:], _block())
    _, group, _ = bipartite_merge_plan(metric, torch.ones(2, n), 4)
    assert (torch.stack([torch.bincount(g, minlength=4) for g in group]) > 3).any()  # multi-round groups
    out, _, _, sizes = sel.merge(x, _block(), k=4, fuse=False)
    for b in range(2):
        for j in range(4):
            members = x[b, 1:][group[b] == j]
            assert torch.allclose(out[b, 1 + j], members.mean(0), atol=1e-5)
            assert sizes[b, j] == members.shape[0]


def test_merge_tokens_weights_by_given_sizes():
    x = torch.tensor([[[1.0, 0.0], [4.0, 3.0], [10.0, 10.0]]])
    sizes = torch.tensor([[1.0, 3.0, 2.0]])
    group, rep = torch.tensor([[0, 0, 1]]), torch.tensor([[1, 2]])
    out, total = merge_tokens(x, sizes, group, rep)
    assert torch.allclose(out[0, 0], torch.tensor([(1 + 3 * 4) / 4, 9 / 4]))
    assert torch.equal(out[0, 1], x[0, 2]) and total.tolist() == [[4.0, 2.0]]


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_token_count_matches_the_selectors(keep):
    torch.manual_seed(2)
    images, query = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    with torch.no_grad():
        tome = _vit("tome", keep)(images, query)
        tpd = _vit("tpd", keep)(images, query)
    k = num_keep(16, keep)
    assert tome.tokens.shape == tpd.tokens.shape == (3, 1 + k + 1, 64)
    sel = tome.selections[0]
    assert sel.kept.shape == (3, k) and sel.fuse_weights is None
    assert torch.equal(sel.kept, sel.logits.topk(k, dim=1).indices)  # best first, like the selectors
    assert torch.equal(sel.sizes.sum(1), torch.full((3,), 16.0))  # every patch is in exactly one token
    # without the fused token: K merged tokens, like the selectors' [CLS, K]
    nofuse = _vit("tome", keep, (2,), "model.select.fuse_dropped=false")
    with torch.no_grad():
        assert nofuse(images).tokens.shape == (3, 1 + k, 64)


def test_two_stages_carry_sizes_and_fused_token():
    vit = _vit("tome", 0.5, (1, 3))
    with torch.no_grad():
        out = vit(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 1 + 4 + 1, 64)  # 16 -> 8 -> 4 kept, one fused token
    first, second = out.selections
    assert torch.equal(second.candidates, first.kept)
    assert torch.equal(second.sizes.sum(1), torch.full((2,), 16.0))  # stage 2 still covers all patches
    assert set(out.kept[0].tolist()) <= set(first.kept[0].tolist())


def test_keep_ratio_one_is_the_unpruned_model():
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    ref, tome = _vit("none", 1.0), _vit("tome", 1.0)
    tome.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(ref(images).tokens, tome(images).tokens)
        assert tome(images).selections == []


def test_batch_independence():
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    vit = _vit("tome", 0.3, (1, 3))
    with torch.no_grad():
        batched = vit(images)
        for i in range(4):
            one = vit(images[i : i + 1])
            assert torch.allclose(batched.tokens[i], one.tokens[0], atol=1e-5)
            assert torch.equal(batched.kept[i], one.kept[0])


def test_forward_backward_through_the_merge(micro_cfg):
    from copa.model.copa import COPAModel

    cfg = micro_cfg("model.select.selector=tome")
    torch.manual_seed(0)
    model = COPAModel(cfg.model).train()
    ids = torch.randint(1000, 2000, (2, 6))
    fused = model(torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids))
    assert fused.vision.tokens.shape[1] == 1 + 8 + 1
    fused.image.sum().backward()
    # gradient reaches the prefix through the merged averages, and the block whose keys matched them
    assert model.vision.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0
    box = model.ground(fused).box
    assert box.shape == (2, 4)


def test_pta_logits_rank_the_patches(micro_model):
    """PTA metrics call the selector directly: logits (B, N) in [0, 1] whose top-K are the kept."""
    from copa.evaluation import with_selector

    m = with_selector(micro_model, "tome")
    with torch.no_grad():
        prefix = m.image_prefix(torch.randn(2, 3, 32, 32))
        logits = m.selector_logits(prefix, None)
        out = m.image_tokens(prefix)
    assert logits.shape == (2, 16) and logits.min() >= 0 and logits.max() == 1
    assert torch.equal(out.kept, logits.topk(8, dim=1).indices)


def test_ablation_lists_include_tome_and_random():
    from copa.evaluation import ABLATION_SELECTORS, TASK_ABLATION_SELECTORS

    assert {"random", "tome"} <= set(ABLATION_SELECTORS)
    assert {"random", "tome"} <= set(TASK_ABLATION_SELECTORS)


def test_bench_runs_tome(tmp_path):
    import json

    from copa.cli import main

    sets = [a for o in (*MICRO, "model.select.selector=tome") for a in ("--set", o)]
    rc = main(
        [
            "bench",
            "--config",
            "configs/tiny.yaml",
            *sets,
            "--batch",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--keep",
            "2:0.5",
            "--precision",
            "fp32",
            "--peak-size",
            "0",
            "--text-len",
            "6",
            "--no-memory",
            "--train",
            "--train-batch",
            "2",
            "--train-runs",
            "1",
            "--train-warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["selector"] == "tome"
    assert [r["visual_tokens"] for r in data["results"]] == [17, 1 + 8 + 1]
    assert data["results"][1]["flops_ratio"] > 1.0 and data["train"][1]["flops_ratio"] > 1.0

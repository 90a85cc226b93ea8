"""Pre-training objectives: masking, prefix split, hard negatives, PTA metrics on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from copa.train.losses import ITCLoss, mask_tokens, sample_hard_negatives, split_prefix
from copa.train.pta_metrics import average_precision, object_patch_recall, random_recall_expectation


def test_hard_negatives_never_pick_the_positive():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 2, 2, 3])  # rows 2 and 3 show the same image
    for _ in range(200):
        sim = torch.randn(5, 5) * 5 + torch.eye(5) * 20  # the positive is by far the most similar
        nt, ni = sample_hard_negatives(sim, ids)
        assert (ids[nt] != ids).all() and (ids[ni] != ids).all()


def test_hard_negatives_prefer_similar():
    torch.manual_seed(0)
    sim = torch.full((3, 3), -10.0)
    sim[0, 1] = 10.0  # text 1 is by far the hardest negative for image 0
    counts = torch.zeros(3)
    for _ in range(100):
        nt, _ = sample_hard_negatives(sim, torch.arange(3))
        counts[nt[0]] += 1
    assert counts[1] > 95


def test_hard_negatives_need_two_images():
    with pytest.raises(ValueError, match="two distinct images"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([4, 4]))


def test_itc_loss_perfect_alignment_is_low_and_symmetric():
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    low, sim = ITCLoss()(f, f, torch.tensor(100.0), torch.arange(4))
    high, _ = ITCLoss()(f, f.roll(1, 0), torch.tensor(100.0), torch.arange(4))
    assert low < 0.1 < high and sim.shape == (4, 4)


def test_mask_tokens_80_10_10():
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 40))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    special = (ids == 101) | (ids == 102)
    out, labels = mask_tokens(ids, mask, 30522, 103, special, 0.15)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    share = chosen.float().mean().item()
    assert 0.12 < share < 0.18
    masked = (out == 103) & chosen
    assert 0.7 < masked.sum().item() / chosen.sum().item() < 0.9
    assert (out[~chosen] == ids[~chosen]).all()


def test_split_prefix_reassembles_caption():
    torch.manual_seed(0)
    ids = torch.tensor([[101, 5, 6, 7, 8, 102, 0], [101, 9, 10, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    for _ in range(20):
        pre, pmask, dec_in, _dmask, target = split_prefix(ids, mask, 101, 102, 0)
        for b in range(2):
            prefix_words = [t for t in pre[b][pmask[b].bool()].tolist() if t not in (101, 102)]
            rest = [t for t in target[b].tolist() if t != -100]
            assert rest[-1] == 102 and len(rest) >= 2  # at least one word to predict, then [SEP]
            words = [t for t in ids[b].tolist() if t not in (0, 101, 102)]
            assert prefix_words + rest[:-1] == words
            assert dec_in[b, 0] == 101 and dec_in[b, 1 : len(rest)].tolist() == rest[:-1]


def test_average_precision_hand_cases():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.05], [0.1, 0.9, 0.8, 0.05]])
    lab = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    ap = average_precision(s, lab)
    assert ap[0].item() == pytest.approx(1.0)
    assert ap[1].item() == pytest.approx(1 / 3)
    # ties are pessimistic: an all-equal ranking puts the positive after both negatives
    assert average_precision(torch.zeros(1, 3), torch.tensor([[0, 1, 0]]))[0].item() == pytest.approx(1 / 3)
    assert math.isnan(average_precision(s[:1], torch.zeros(1, 4))[0].item())


def test_object_patch_recall_hand_cases():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert object_patch_recall(logits, torch.tensor([[1, 0, 0, 1]]), 0.5)[0].item() == pytest.approx(0.5)
    assert object_patch_recall(logits, torch.tensor([[1, 1, 0, 0]]), 0.5)[0].item() == pytest.approx(1.0)
    assert object_patch_recall(logits, torch.tensor([[0, 0, 1, 1]]), 0.5)[0].item() == pytest.approx(0.0)
    assert random_recall_expectation(64, 0.5) == pytest.approx(0.5)
    # a random ranking's recall averages the keep ratio
    torch.manual_seed(0)
    lab = (torch.rand(2000, 64) < 0.2).long()
    r = object_patch_recall(torch.randn(2000, 64), lab, 0.25)
    assert r[~r.isnan()].mean().item() == pytest.approx(0.25, abs=0.02)


def test_hard_negatives_survive_non_finite_similarities():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2])
    sim = torch.randn(4, 4)
    sim[0, :] = float("nan")
    sim[:, 2] = float("inf")
    sim[3, 1] = -float("inf")
    for _ in range(50):
        nt, ni = sample_hard_negatives(sim, ids)
        assert (ids[nt] != ids).all() and (ids[ni] != ids).all()

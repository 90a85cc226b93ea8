"""Downstream metrics on hand-computed cases: recall@k with ties, random-ranking baseline, VQA soft
score, box ops / IoU / GIoU / grounding accuracy, and pycocoevalcap caption scores."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from copa.tasks import box_ops
from copa.tasks.metrics import (
    grounding_metrics,
    gt_ranks,
    majority_answer,
    normalize_answer,
    random_retrieval_baseline,
    recall_at_k,
    retrieval_metrics,
    vqa_accuracy,
    vqa_score,
)


# ------------------------------------------------------------------------------- retrieval
def test_gt_ranks_pessimistic_ties_and_best_of_several_positives():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.3],  # positive (col 0) strictly best -> rank 0
            [0.5, 0.5, 0.2, 0.1],  # positive (col 0) tied with one negative -> ranked after it: 1
            [0.1, 0.1, 0.1, 0.1],  # all tied: the positive ranks after all 3 negatives
            [0.2, 0.8, 0.7, 0.9],  # positives cols 1 and 2: best is 0.8, one negative (0.9) above
        ]
    )
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 0] = pos[2, 0] = pos[3, 1] = pos[3, 2] = True
    ranks = gt_ranks(scores, pos)
    assert ranks.tolist() == [0, 1, 3, 1]
    r = recall_at_k(ranks, (1, 2, 4))
    assert r == {1: 25.0, 2: 75.0, 4: 100.0}


def test_retrieval_metrics_by_hand():
    # 2 images, 3 texts: texts 0, 1 describe image 0; text 2 describes image 1
    text_image = torch.tensor([0, 0, 1])
    i2t = torch.tensor(
        [[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]]
    )  # image 0: best text 1 (hit); image 1: text 2 ranked 2nd
    t2i = torch.tensor([[0.7, 0.2], [0.4, 0.4], [0.1, 0.6]])  # text 1 ties -> miss at R@1
    m = retrieval_metrics(i2t, t2i, text_image)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == pytest.approx(200 / 3) and m["t2i_r5"] == 100.0
    keys = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(m) == keys | {"r_mean"}
    assert m["r_mean"] == pytest.approx(sum(m[k] for k in keys) / 6)


def test_random_baseline_matches_simulation():
    text_image = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])
    exact = random_retrieval_baseline(text_image, 6)
    assert exact["t2i_r1"] == pytest.approx(100 / 6) and exact["t2i_r10"] == 100.0
    g, trials = torch.Generator().manual_seed(0), 4000
    pos_i2t = (text_image[None, :] == torch.arange(6)[:, None]).repeat(trials, 1)  # (trials*6, 12)
    pos_t2i = (text_image[:, None] == torch.arange(6)[None, :]).repeat(trials, 1)  # (trials*12, 6)
    sim = {
        "i2t": recall_at_k(gt_ranks(torch.rand(trials * 6, 12, generator=g), pos_i2t)),
        "t2i": recall_at_k(gt_ranks(torch.rand(trials * 12, 6, generator=g), pos_t2i)),
    }
    for d, k in (("i2t", 1), ("i2t", 5), ("t2i", 5)):
        assert sim[d][k] == pytest.approx(exact[f"{d}_r{k}"], abs=1.5)


# ------------------------------------------------------------------------------------- VQA
def test_vqa_normalisation_and_soft_score():
    assert normalize_answer("The Red!") == "red"
    assert normalize_answer("  an  Apple. ") == "apple"
    assert vqa_score("Yes.", ["yes"]) == 1.0  # one reference: exact match after normalisation
    assert vqa_score("no", ["yes"]) == 0.0
    refs = ["red", "red", "orange", "Red", "dark red"]
    # leave-one-out mean of min(1, matches/3): 3 subsets hold 2 "red", 2 subsets hold 3
    assert vqa_score("red", refs) == pytest.approx((3 * 2 / 3 + 2 * 1.0) / 5)
    assert vqa_score("orange", refs) == pytest.approx(4 / 15)
    assert vqa_score("blue", refs) == 0.0
    assert vqa_score("red", ["red", "blue"]) == pytest.approx(1 / 6)
    assert vqa_accuracy(["red", "blue"], [refs, ["blue"]]) == pytest.approx(100.0 * (0.8 + 1.0) / 2)
    assert majority_answer([["yes"], ["no"], ["Yes"], ["2"]]) == "yes"


def test_vqa_accuracy_is_the_official_mean_over_10_choose_9_subsets():
    # with 10 references, 0..4+ matching answers score 0, 0.3, 0.6, 0.9, 1 (min(1, m/3) gave 1/3, 2/3, 1)
    expect = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    for m, e in enumerate(expect):
        assert vqa_score("two", ["2"] * m + ["3"] * (10 - m)) == pytest.approx(e), m
    refs = ["yes"] * 2 + ["no"] * 8
    assert vqa_accuracy(["Yes", "no"], [refs, refs]) == pytest.approx(100.0 * (0.6 + 1.0) / 2)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),  # number words -> digits, final period dropped
        ("none", "0"),
        ("The Ten", "10"),  # articles dropped
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions regain their apostrophe
        ("couldnt've", "couldn't've"),
        ("isn't", "isn't"),
        ("2.5", "2.5"),  # a period before a digit is a decimal point
        ("1,000", "1000"),  # digit,digit: punctuation deleted, not spaced
        ("red, white", "red white"),  # punctuation next to a space is deleted
        ("black-and-white", "black and white"),  # elsewhere it becomes a space
        ("yes!", "yes"),
        ("  Left\tside\n", "left side"),
        ("cat's", "cat's"),  # apostrophes are kept
    ],
)
def test_vqa_answer_normalisation_known_cases(raw, norm):
    assert normalize_answer(raw) == norm


# ------------------------------------------------------------------------------ box ops
def test_box_conversions_round_trip():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = box_ops.cxcywh_to_xyxy(b)
    assert torch.allclose(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(box_ops.xyxy_to_cxcywh(xyxy), b)


def test_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    iou = box_ops.box_iou(a, b)
    assert iou.tolist() == pytest.approx([1 / 7, 1.0, 0.0])
    giou = box_ops.generalized_box_iou(a, b)
    # pair 0: enclosing box 3x3 = 9, union 7 -> 1/7 - 2/9; pair 2: enclosing 3x1, union 2 -> -1/3
    assert giou.tolist() == pytest.approx([1 / 7 - 2 / 9, 1.0, -1 / 3])


def test_giou_loss_pulls_disjoint_boxes_together():
    pred = torch.tensor([[0.2, 0.2, 0.1, 0.1]], requires_grad=True)
    target = torch.tensor([[0.7, 0.7, 0.2, 0.2]])
    g = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))
    (1 - g).sum().backward()
    assert pred.grad[0, 0] < 0 and pred.grad[0, 1] < 0  # moving the centre towards the target helps


def test_grounding_metrics_by_hand():
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2]])
    m = grounding_metrics(pred, gt)
    assert m["acc@0.5"] == pytest.approx(200 / 3)  # IoUs 1, 0.5 (counted: >=), 0
    assert m["miou"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ captions
REFS = {
    1: ["a red circle on the left", "there is a red circle"],
    2: ["two objects: a blue star and a green square", "a blue star above a green square"],
}


def test_caption_scores_two_captions():
    from copa.tasks.caption_metrics import caption_scores

    res = {
        "exact": {1: "a red circle on the left", 2: "a blue star above a green square"},
        "partial": {1: "a red square", 2: "a green star"},
        "empty": {1: "", 2: ""},
    }
    per_image: dict = {}
    s = caption_scores(REFS, res, meteor=False, cider_per_image=per_image)
    assert set(per_image["partial"]) == set(REFS)
    assert sum(per_image["partial"].values()) / len(REFS) == pytest.approx(s["partial"]["cider"])
    assert s["exact"]["bleu4"] == pytest.approx(1.0, abs=1e-6) and s["exact"]["rouge_l"] == pytest.approx(1.0)
    assert 2.0 < s["exact"]["cider"] <= 10.0
    p = s["partial"]
    assert (
        0.3 < p["bleu1"] < 1.0
        and p["bleu4"] < 0.1
        and 0.2 < p["rouge_l"] < 0.8
        and 0.0 < p["cider"] < s["exact"]["cider"]
    )
    assert all(v == 0.0 for v in s["empty"].values())
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"} <= set(p) and "meteor" not in p


def test_meteor_failure_degrades_gracefully(monkeypatch, caplog):
    import pycocoevalcap.meteor.meteor as meteor_mod

    from copa.tasks import caption_metrics

    def broken(*a, **k):
        raise FileNotFoundError("java")

    monkeypatch.setattr(meteor_mod, "Meteor", broken)
    monkeypatch.setattr(caption_metrics, "_ptb", lambda texts: None)  # no java for PTB either
    with caplog.at_level(logging.WARNING):
        s = caption_metrics.caption_scores(REFS, {"m": {1: "a red circle", 2: "a blue star"}}, meteor=True)
    assert "meteor" not in s["m"] and math.isfinite(s["m"]["cider"]) and s["m"]["bleu1"] > 0
    assert any("METEOR failed" in r.message for r in caplog.records)
    assert caption_metrics.simple_tokenize("A Red, circle!") == "a red circle"


@pytest.mark.slow
def test_meteor_runs_with_java():
    import shutil

    from copa.tasks.caption_metrics import caption_scores

    if not shutil.which("java"):
        pytest.skip("no java")
    s = caption_scores(REFS, {"m": {1: "a red circle on the left", 2: "a green star"}}, meteor=True)
    assert 0.0 < s["m"]["meteor"] < 1.0


def test_query_units_average_to_r_mean_and_bootstrap_brackets_the_difference():
    from copa.tasks.metrics import paired_bootstrap, query_recall_units, retrieval_metrics

    g = torch.Generator().manual_seed(0)
    text_image = torch.arange(12).repeat_interleave(3)  # 12 images, 3 captions each
    i2t, t2i = torch.randn(12, 36, generator=g), torch.randn(36, 12, generator=g)
    img_u, txt_u = query_recall_units(i2t, t2i, text_image)
    units = img_u + txt_u
    weights = [0.5 / 12] * 12 + [0.5 / 36] * 36
    r_mean = retrieval_metrics(i2t, t2i, text_image)["r_mean"]
    assert sum(u * w for u, w in zip(units, weights, strict=True)) == pytest.approx(r_mean)

    groups = list(range(12)) + text_image.tolist()
    same = paired_bootstrap(units, units, groups, weights)
    assert same["diff"] == same["low"] == same["high"] == 0.0 and same["groups"] == 12
    better = [u + 10.0 for u in units]
    b = paired_bootstrap(better, units, groups, weights)
    assert b["diff"] == pytest.approx(10.0) and b["low"] == pytest.approx(10.0)
    noisy = [u + float(v) for u, v in zip(units, torch.randn(48, generator=g) * 20, strict=True)]
    c = paired_bootstrap(noisy, units, groups, weights)
    assert c["low"] < c["diff"] < c["high"] and c["high"] - c["low"] > 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0], [0, 1])

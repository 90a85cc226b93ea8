"""Downstream metrics: retrieval recall@k, VQA accuracy, grounding accuracy / IoU, and the trivial
baselines each is compared with.

Conventions: recalls and accuracies are percentages (0-100, as papers report them); mean IoU is a
fraction in [0, 1].

**Tie policy (recall@k).** Ties are broken *against* the query: a ground-truth item ranks after
every wrong candidate whose score is greater than **or equal to** its own. A model that gives every
candidate the same score therefore gets no credit for it (with the optimistic policy a constant
scorer would reach R@1 = 100%). Rank of a query with several ground-truth items (an image and its
captions) = the rank of its best-scored ground-truth item; the other ground-truth items never
count against it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from copa.tasks.box_ops import box_iou, cxcywh_to_xyxy

RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------------------ retrieval
def gt_ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """0-based rank of each query's best ground-truth item under the pessimistic tie policy.

    scores: (Q, C) query-candidate scores; positives: (Q, C) bool, at least one True per row
    -> (Q,) long: the number of wrong candidates scoring >= the best ground-truth score.
    """
    if not bool(positives.any(1).all()):
        raise ValueError("every query needs at least one ground-truth candidate")
    scores = scores.float()
    best = scores.masked_fill(~positives, float("-inf")).max(1).values  # (Q,)
    return ((scores >= best[:, None]) & ~positives).sum(1)


def recall_at_k(ranks: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """ranks: (Q,) 0-based ranks -> {k: % of queries whose ground truth is in the top k}"""
    return {k: 100.0 * float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(i2t_scores: Tensor, t2i_scores: Tensor, text_image: Tensor) -> dict[str, float]:
    """R@1/5/10 both ways and their mean ``r_mean``.

    i2t_scores: (I, T) score of text t for image query i; t2i_scores: (T, I) score of image i for
    text query t; text_image: (T,) long, the image each text describes. An image->text hit is any
    of the image's texts; a text->image hit is its own image.
    """
    n_img = i2t_scores.shape[0]
    pos_t2i = text_image[:, None] == torch.arange(n_img)[None, :]  # (T, I)
    out: dict[str, float] = {}
    for name, r in (("i2t", gt_ranks(i2t_scores, pos_t2i.t())), ("t2i", gt_ranks(t2i_scores, pos_t2i))):
        out.update({f"{name}_r{k}": v for k, v in recall_at_k(r).items()})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def query_recall_units(
    i2t_scores: Tensor, t2i_scores: Tensor, text_image: Tensor
) -> tuple[list[float], list[float]]:
    """Each query's share of ``r_mean``: the mean over k of its hit@k (in %), for the image queries
    (I,) and the text queries (T,). ``r_mean`` = (mean of the image queries' + mean of the text
    queries') / 2, which is how ``paired_bootstrap`` weighs them (``unit_weight``)."""
    n_img = i2t_scores.shape[0]
    pos_t2i = text_image[:, None] == torch.arange(n_img)[None, :]  # (T, I)
    out = []
    for scores, pos in ((i2t_scores, pos_t2i.t()), (t2i_scores, pos_t2i)):
        r = gt_ranks(scores, pos)
        out.append((100.0 * torch.stack([(r < k).float() for k in RECALL_KS]).mean(0)).tolist())
    return out[0], out[1]


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    groups: Sequence[object],
    weights: Sequence[float] | None = None,
    n: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Difference of two evaluations of the same samples (``a`` - ``b``, weighted means) and its 95%
    interval over test sets resampled by ``groups`` (the image each sample belongs to: the questions
    of one image rise and fall together, so they are drawn together).

    a, b, groups, weights: one entry per sample -> {"diff", "low", "high", "groups"}.
    """
    import numpy as np

    if not (len(a) == len(b) == len(groups)) or not len(a):
        raise ValueError(f"paired_bootstrap needs equal, non-empty lists: {len(a)}, {len(b)}, {len(groups)}")
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * w
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = np.array([keys[g] for g in groups])
    sum_d = np.bincount(gid, weights=d, minlength=len(keys))  # per group: weighted difference, weight
    sum_w = np.bincount(gid, weights=w, minlength=len(keys))
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n, len(keys)))
    boot = sum_d[draws].sum(1) / sum_w[draws].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.sum() / w.sum()), "low": float(low), "high": float(high), "groups": len(keys)}


def _hit_prob(n: int, m: int, k: int) -> float:
    """Chance that at least one of m ground-truth items is in the top k of a random order of n."""
    if k >= n - m + 1:
        return 1.0
    # 1 - C(n-m, k) / C(n, k), in logs so large galleries do not overflow
    log_miss = (math.lgamma(n - m + 1) - math.lgamma(n - m - k + 1)) - (
        math.lgamma(n + 1) - math.lgamma(n - k + 1)
    )
    return 1.0 - math.exp(log_miss)


def random_retrieval_baseline(text_image: Tensor, n_img: int) -> dict[str, float]:
    """Expected R@k of a uniformly random ranking (exact, no sampling), keys as ``retrieval_metrics``."""
    n_txt = int(text_image.shape[0])
    per_image = torch.bincount(text_image, minlength=n_img).tolist()
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = 100.0 * sum(_hit_prob(n_txt, m, k) for m in per_image) / n_img
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * _hit_prob(n_img, 1, k)
    out["r_mean"] = sum(out.values()) / len(out)
    return out


# ------------------------------------------------------------------------------------------ VQA
# The VQA evaluation's answer normalisation (Antol et al. 2015; v2 evaluation), written from its
# description: punctuation is deleted where it touches a space (or the text has a digit,digit comma)
# and becomes a space elsewhere; a period is deleted unless a digit follows (so "2.5" survives);
# then, word by word and lowercased, number words become digits, articles are dropped and
# contractions written without an apostrophe get it back.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# unambiguous ones only: "its", "ill", "well", "were", "id", "hell", "shell" are words too
_CANONICAL = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd've",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "o'clock",
    "shan't",
    "she'd've",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'll",
    "someone's",
    "something'd",
    "something'll",
    "something's",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who're",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of ``word`` with one or more of its apostrophes left out ("couldn'tve", ...)."""
    parts = word.split("'")
    out = []
    for keep in itertools.product(("'", ""), repeat=len(parts) - 1):
        if "" in keep:
            out.append(parts[0] + "".join(k + p for k, p in zip(keep, parts[1:], strict=True)))
    return out


_CONTRACTIONS = {v: w for w in _CANONICAL for v in _apostrophe_variants(w)}


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see above): "Two dogs." -> "2 dogs", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # the delete-or-space choice is made on the input, not on the partly processed text
    delete = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p in text:
            out = out.replace(p, "" if delete or f"{p} " in text or f" {p}" in text else " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction, in [0, 1].

    With n > 1 reference answers (10 in VQA v2): the mean, over the n ways of leaving one reference
    out, of ``min(1, #matches among the other n-1 / 3)`` (after ``normalize_answer``); so with 10
    references 0, 1, 2, 3, 4+ matches score 0, 0.3, 0.6, 0.9, 1. With one reference, exact match
    (leaving it out would leave nothing to match).
    """
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    matches = sum(hits)
    return sum(min(1.0, (matches - h) / 3.0) for h in hits) / len(hits)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean ``vqa_score`` in percent."""
    if not predictions:
        return 0.0
    return 100.0 * sum(vqa_score(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


def majority_answer(answers: Sequence[Sequence[str]]) -> str:
    """The most frequent normalised reference answer (ties: the first met)."""
    counts = Counter(normalize_answer(a) for refs in answers for a in refs)
    if not counts:
        return ""
    return counts.most_common(1)[0][0]


def accuracy_by_type(
    preds: Sequence[Mapping[str, Any]], reference: Sequence[tuple[str, Sequence[str]]]
) -> dict[str, dict[str, Any]]:
    """VQA accuracy per question type: ``preds`` carry ``type``, ``score`` (0..1) and ``answers``;
    ``reference`` is (type, answers) of the questions the majority answers come from (the training
    split). -> {type: {questions, accuracy (%), majority_answer (the type's most frequent reference
    answer; of the scored questions when ``reference`` has none of the type), majority_accuracy (%)}}."""
    by_ref: dict[str, list[Sequence[str]]] = {}
    for kind, answers in reference:
        by_ref.setdefault(kind, []).append(answers)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in preds:
        groups.setdefault(p["type"], []).append(p)
    out: dict[str, dict[str, Any]] = {}
    for kind, ps in sorted(groups.items()):
        majority = majority_answer(by_ref.get(kind) or [p["answers"] for p in ps])
        out[kind] = {
            "questions": len(ps),
            "accuracy": 100.0 * sum(p["score"] for p in ps) / len(ps),
            "majority_answer": majority,
            "majority_accuracy": 100.0 * sum(vqa_score(majority, p["answers"]) for p in ps) / len(ps),
        }
    return out


# ------------------------------------------------------------------------------------ grounding
def grounding_metrics(pred: Tensor, target: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """pred, target: (B, 4) normalised cxcywh -> accuracy at IoU >= threshold (%) and mean IoU."""
    iou = box_iou(cxcywh_to_xyxy(pred.float()), cxcywh_to_xyxy(target.float()))
    if iou.numel() == 0:
        return {f"acc@{threshold}": 0.0, "miou": 0.0}
    return {f"acc@{threshold}": 100.0 * float((iou >= threshold).float().mean()), "miou": float(iou.mean())}

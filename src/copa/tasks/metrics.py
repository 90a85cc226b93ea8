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

import math
import re
from collections import Counter
from collections.abc import Sequence

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
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Light VQA normalisation: lowercase, punctuation -> space, drop articles, squeeze spaces."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Per-question score in [0, 1]: ``min(1, #matching references / 3)`` with several reference
    answers (the VQA soft score), exact match (after ``normalize_answer``) with one."""
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    if len(answers) == 1:
        return float(matches)
    return min(1.0, matches / 3.0)


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


# ------------------------------------------------------------------------------------ grounding
def grounding_metrics(pred: Tensor, target: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """pred, target: (B, 4) normalised cxcywh -> accuracy at IoU >= threshold (%) and mean IoU."""
    iou = box_iou(cxcywh_to_xyxy(pred.float()), cxcywh_to_xyxy(target.float()))
    if iou.numel() == 0:
        return {f"acc@{threshold}": 0.0, "miou": 0.0}
    return {f"acc@{threshold}": 100.0 * float((iou >= threshold).float().mean()), "miou": float(iou.mean())}

"""Patch-Text Alignment quality: per-patch average precision, object-patch recall and text
specificity.

Object-patch recall is the share of the patches under the queried object's box that survive
selection at a keep ratio; random selection scores the keep ratio itself in expectation.
Text specificity is the recall of the queried object's patches minus the recall of the *other*
objects' patches of the same image under the same query: a selector that keeps "objects" whatever
the text says scores 0 however high its recall, and so does random selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from copa.model.selection import num_keep


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """AP of each row's ranking. scores, labels: (Q, N) -> (Q,); rows without positives -> nan.

    AP = mean over positives of precision at that positive's rank; ties are broken by position,
    pessimistically for positives (negatives with an equal score rank first), so AP never flatters.
    """
    n = scores.shape[1]
    labels = labels.float()
    # sort by score desc; among equal scores put negatives first (pessimistic tie-breaking)
    key = scores.double() - labels.double() * 1e-12
    order = key.argsort(dim=1, descending=True, stable=True)
    rel = labels.gather(1, order)
    hits = rel.cumsum(1)
    ranks = torch.arange(1, n + 1, device=scores.device).double()
    prec = hits.double() / ranks
    npos = rel.sum(1)
    ap = (prec * rel).sum(1) / npos.clamp(min=1)
    return torch.where(npos > 0, ap, torch.full_like(ap, float("nan"))).float()


def object_patch_recall(logits: Tensor, labels: Tensor, keep_ratio: float) -> Tensor:
    """Share of positive patches inside the top-K by logit. (Q, N), (Q, N) -> (Q,); no positives -> nan."""
    n = logits.shape[1]
    k = num_keep(n, keep_ratio)
    kept = torch.zeros_like(labels, dtype=torch.bool)
    kept.scatter_(1, logits.topk(k, dim=1).indices, True)
    pos = labels.bool()
    npos = pos.sum(1)
    rec = (kept & pos).sum(1).float() / npos.clamp(min=1)
    return torch.where(npos > 0, rec, torch.full_like(rec, float("nan")))


def text_specificity(logits: Tensor, labels: Tensor, image: Tensor, keep_ratio: float) -> Tensor:
    """Per phrase query: recall of its object's patches minus the mean recall of each other object's
    patches of the same image (those patches not under the queried object), at ``keep_ratio``.

    logits, labels: (Q, N) for Q phrase queries; image: (Q,) which image each query belongs to (all
    objects of an image must be among the rows). -> (Q,); nan for queries whose image has no other
    object with patches of its own.
    """
    q, n = logits.shape
    k = num_keep(n, keep_ratio)
    kept = torch.zeros_like(labels, dtype=torch.bool)
    kept.scatter_(1, logits.topk(k, dim=1).indices, True)
    pos = labels.bool()
    own = (kept & pos).sum(1).float() / pos.sum(1).clamp(min=1)
    # other[a, b]: patches of row b's object not under row a's object, for rows of the same image
    same = (image[:, None] == image[None, :]) & ~torch.eye(q, dtype=torch.bool, device=logits.device)
    other = pos[None, :, :] & ~pos[:, None, :]  # (Q, Q, N)
    n_other = other.sum(-1)
    hit = (other & kept[:, None, :]).sum(-1).float() / n_other.clamp(min=1)
    valid = same & (n_other > 0)
    other_rec = (hit * valid).sum(1) / valid.sum(1).clamp(min=1)
    ok = valid.any(1) & (pos.sum(1) > 0)
    return torch.where(ok, own - other_rec, torch.full_like(own, float("nan")))


SPECIFICITY_KEEPS = (0.25, 0.5)


def random_recall_expectation(n: int, keep_ratio: float) -> float:
    """Expected object-patch recall of a uniformly random selection: K / N."""
    return num_keep(n, keep_ratio) / n


class PTAMeter:
    """Accumulates AP and recall over batches for phrase queries and the text-agnostic query."""

    def __init__(self, keep_ratio: float) -> None:
        self.keep_ratio = keep_ratio
        self.vals: dict[str, list[Tensor]] = {
            "ap_phrase": [],
            "recall_phrase": [],
            "ap_agnostic": [],
            "recall_agnostic": [],
        }
        for r in SPECIFICITY_KEEPS:
            self.vals[f"specificity@{r:g}"] = []
        self.n = 0

    def add(self, kind: str, logits: Tensor, labels: Tensor, image: Tensor | None = None) -> None:
        """``image`` (Q,): the image of each phrase row; with it, text specificity is measured too."""
        if logits.shape[0] == 0:
            return
        self.n = logits.shape[1]
        logits = logits.detach().float()
        self.vals[f"ap_{kind}"].append(average_precision(logits, labels))
        self.vals[f"recall_{kind}"].append(object_patch_recall(logits, labels, self.keep_ratio))
        if image is not None:
            for r in SPECIFICITY_KEEPS:
                self.vals[f"specificity@{r:g}"].append(text_specificity(logits, labels, image, r))

    def result(self) -> dict[str, float]:
        out = {}
        for k, v in self.vals.items():
            if v:
                x = torch.cat(v)
                x = x[~x.isnan()]
                out[k] = float(x.mean()) if x.numel() else float("nan")
        out["keep_ratio"] = self.keep_ratio
        if self.n:
            out["recall_random"] = random_recall_expectation(self.n, self.keep_ratio)
        return out

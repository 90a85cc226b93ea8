"""Patch selection: the Text-aware Patch Detector (TPD) and the baseline selectors.

Every selector maps the tokens entering a selection point, ``x: (B, 1+N, D)`` (image [CLS] first),
and an optional text query ``t: (B, Dt)`` to patch logits ``(B, N)``. ``select_and_fuse`` keeps the
top-K patches by logit with ``topk``-style sorting and ``gather`` (no masks, so the pruned sequence
is really shorter in training too) and fuses the dropped ones into one token weighted by the
softmax of their logits. The fused-token weights are also how a loss on the output sends gradient
back into the selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from copa.model.layers import ViTBlock


def num_keep(n: int, ratio: float) -> int:
    """K = ceil(ratio * N), clamped to [1, N]."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


@dataclass
class Selection:
    """What one selection stage did.

    - ``logits``: (B, N_s) selector logits of the candidate patches (sigmoid gives TPD scores);
    - ``candidates``: (B, N_s) original patch index (0..N-1) of each candidate;
    - ``kept``: (B, K) original patch indices kept, best first;
    - ``fuse_weights``: (B, N_s - K) softmax weights of the dropped patches in the fused token.
    """

    logits: Tensor
    candidates: Tensor
    kept: Tensor
    fuse_weights: Tensor | None


def select_and_fuse(
    x: Tensor,
    logits: Tensor,
    k: int,
    fuse: bool = True,
    fused_prev: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep the top-k patches of ``x`` and fuse the rest.

    x: (B, 1+N, D) with [CLS] first; logits: (B, N). ``fused_prev`` = (token (B, 1, D), alpha) is
    the fused token of an earlier stage and the share alpha of all dropped patches it stands for;
    the new fused token is the count-weighted mean of both, so it still averages every dropped patch.
    Returns (out, order, weights): out (B, 1+K+1, D) = [CLS, kept, fused] (no fused token when
    ``fuse`` is False or K = N); order (B, N) positions sorted by logit, best first; weights (B, N-K).
    """
    b, n1, d = x.shape
    n = n1 - 1
    cls, patches = x[:, :1], x[:, 1:]
    _, order = logits.sort(dim=1, descending=True)
    keep_idx = order[:, :k]
    kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(b, k, d))
    if not fuse or k == n:
        return torch.cat([cls, kept], dim=1), order, None
    drop_idx = order[:, k:]
    weights = logits.gather(1, drop_idx).float().softmax(dim=1).to(x.dtype)  # (B, N-K)
    dropped = patches.gather(1, drop_idx.unsqueeze(-1).expand(b, n - k, d))
    fused = torch.bmm(weights.unsqueeze(1), dropped)  # (B, 1, D)
    if fused_prev is not None:
        fused = fused_prev[1] * fused_prev[0] + (1.0 - fused_prev[1]) * fused
    return torch.cat([cls, kept, fused], dim=1), order, weights


class Selector(nn.Module):
    """Interface: ``forward(x, query, block) -> logits (B, N)``."""

    needs_text: bool = False

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class TPD(Selector):
    """Text-aware Patch Detector: ``s_i = sigmoid(MLP([LN(v_i); W t]))``.

    The first MLP layer on the concatenation is split into a patch part and a text part, so the
    text part is computed once per sample and broadcast over patches (same function, less work).
    Without a text, the query is a learned vector (text-agnostic mode).
    """

    needs_text = True

    def __init__(self, dim: int, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.fc_patch = nn.Linear(dim, hidden)
        self.fc_text = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(hidden, 1)
        self.agnostic_query = nn.Parameter(torch.randn(text_dim) * 0.02)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock | None = None) -> Tensor:
        """x: (B, 1+N, D), query: (B, Dt) or None -> logits (B, N)"""
        if query is None:
            query = self.agnostic_query.to(x.dtype).expand(x.shape[0], -1)
        t = self.fc_text(self.text_proj(query))  # (B, hidden)
        h = self.fc_patch(self.norm(x[:, 1:])) + t.unsqueeze(1)
        return self.fc_out(self.act(h)).squeeze(-1)


def _attention_logits(scores: Tensor) -> Tensor:
    """scores: (B, H, 1, N) scaled q.k -> log of head-averaged attention probabilities (B, N)."""
    att = scores.squeeze(2).float().softmax(dim=-1).mean(dim=1)
    return att.clamp_min(1e-12).log().to(scores.dtype)


class ClsAttention(Selector):
    """EViT: keep the patches the image [CLS] attends to most in the next block (no parameters)."""

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:
        return _attention_logits(block.attention_scores(x))  # a block method: FSDP gathers its weights


class TextAttention(Selector):
    """TRIPS: the text [CLS] queries the patch keys through the next block's own query projection.

    Adds parameters only when the text width differs from the vision width (a projection).
    Without a text it falls back to image-[CLS] attention.
    """

    needs_text = True

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.text_proj = nn.Identity() if dim == text_dim else nn.Linear(text_dim, dim)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:
        if query is None:
            return ClsAttention.forward(self, x, None, block)  # type: ignore[arg-type]
        tq = self.text_proj(query).unsqueeze(1).to(x.dtype)  # (B, 1, D)
        # one call for the text query and the patches (LN and projections act per token)
        return _attention_logits(block.attention_scores(torch.cat([tq, x[:, 1:]], dim=1)))


def make_selector(name: str, dim: int, text_dim: int, hidden: int) -> Selector | None:
    if name == "tpd":
        return TPD(dim, text_dim, hidden)
    if name == "text_attn":
        return TextAttention(dim, text_dim)
    if name == "cls_attn":
        return ClsAttention()
    if name == "none":
        return None
    raise ValueError(f"unknown selector {name!r}; expected tpd, text_attn, cls_attn or none")


def tpd_scores(logits: Tensor) -> Tensor:
    """Selector logits -> scores in [0, 1] (TPD's sigmoid)."""
    return torch.sigmoid(logits.float())


def bce_patch_loss(logits: Tensor, labels: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Patch-Text Alignment loss: BCE between logits (B, N) and 0/1 labels (B, N), patch-averaged."""
    pw = torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)

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
    straight_through: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep the top-k patches of ``x`` and fuse the rest.

    x: (B, 1+N, D) with [CLS] first; logits: (B, N). ``fused_prev`` = (token (B, 1, D), alpha) is
    the fused token of an earlier stage and the share alpha of all dropped patches it stands for;
    the new fused token is the count-weighted mean of both, so it still averages every dropped patch.
    ``straight_through`` multiplies each kept token by ``1 + sigmoid(l) - sigmoid(l).detach()``:
    the forward pass is unchanged (the factor is exactly 1), but every loss on the output now sends
    gradient into the kept patches' logits, which ``gather`` alone never does.
    Returns (out, order, weights): out (B, 1+K+1, D) = [CLS, kept, fused] (no fused token when
    ``fuse`` is False or K = N); order (B, N) positions sorted by logit, best first; weights (B, N-K).
    """
    b, n1, d = x.shape
    n = n1 - 1
    cls, patches = x[:, :1], x[:, 1:]
    _, order = logits.sort(dim=1, descending=True)
    keep_idx = order[:, :k]
    kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(b, k, d))
    if straight_through and torch.is_grad_enabled() and logits.requires_grad:
        s = torch.sigmoid(logits.gather(1, keep_idx).float())
        kept = kept * (1.0 + (s - s.detach())).to(kept.dtype).unsqueeze(-1)  # exactly 1 forward
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


TPD_FORMS = ("additive", "bilinear", "film")


class TPD(Selector):
    """Text-aware Patch Detector: patch logits from LN-normalised patch tokens and a text query.

    ``form`` chooses how the text enters (all three share the patch branch ``fc_patch`` on
    ``LN(v_i)`` and the text projection ``W t``):

    - ``additive`` (the paper's ``s_i = sigmoid(MLP([LN(v_i); W t]))``): the first MLP layer on the
      concatenation, split into a patch part and a text part computed once per sample. The text
      can only add the same vector to every patch's hidden state, so a text-blind "objectness"
      ranking is the easy optimum (measured: text specificity ~0).
    - ``bilinear``: ``p_i . q / sqrt(h) + o(p_i)``, a patch embedding ``p_i = MLP(LN(v_i))`` matched
      against a text embedding ``q``, plus a text-independent objectness term ``o``; "this patch
      matches this text" is one dot product.
    - ``film``: the text scales and shifts the patch hidden state,
      ``MLP(GELU(fc_patch(LN v_i) * (1 + g(t)) + b(t)))``.

    Without a text, the query is a learned vector (text-agnostic mode).
    """

    needs_text = True

    def __init__(self, dim: int, text_dim: int, hidden: int, form: str = "additive") -> None:
        super().__init__()
        if form not in TPD_FORMS:
            raise ValueError(f"unknown TPD form {form!r}; expected one of {TPD_FORMS}")
        self.form = form
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.fc_patch = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        if form == "additive":
            self.fc_text = nn.Linear(dim, hidden, bias=False)
            self.fc_out = nn.Linear(hidden, 1)
        elif form == "bilinear":
            self.fc_embed = nn.Linear(hidden, hidden)
            self.fc_text = nn.Linear(dim, hidden)
            self.fc_out = nn.Linear(hidden, 1)  # objectness
        else:
            self.fc_text = nn.Linear(dim, 2 * hidden)
            self.fc_out = nn.Linear(hidden, 1)
        self.agnostic_query = nn.Parameter(torch.randn(text_dim) * 0.02)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock | None = None) -> Tensor:
        """x: (B, 1+N, D), query: (B, Dt) or None -> logits (B, N)"""
        if query is None:
            query = self.agnostic_query.to(x.dtype).expand(x.shape[0], -1)
        t = self.fc_text(self.text_proj(query))  # (B, hidden) or (B, 2 hidden) for film
        h = self.fc_patch(self.norm(x[:, 1:]))  # (B, N, hidden)
        if self.form == "additive":
            return self.fc_out(self.act(h + t.unsqueeze(1))).squeeze(-1)
        if self.form == "bilinear":
            p = self.fc_embed(self.act(h))  # (B, N, hidden)
            match = (p @ t.unsqueeze(-1)).squeeze(-1) / math.sqrt(p.shape[-1])
            return match + self.fc_out(p).squeeze(-1)
        gain, shift = t.unsqueeze(1).chunk(2, dim=-1)
        return self.fc_out(self.act(h * (1.0 + gain) + shift)).squeeze(-1)


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


class RandomSelector(Selector):
    """K patches uniformly at random: the baseline many token-reduction methods fail to beat.

    Logits are i.i.d. uniform per sample and patch, drawn from a private generator seeded once, so
    an evaluation is repeatable; no parameters, text ignored.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._gen: dict[str, torch.Generator] = {}

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock | None = None) -> Tensor:
        key = str(x.device)
        if key not in self._gen:
            self._gen[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        b, n = x.shape[0], x.shape[1] - 1
        return torch.rand(b, n, generator=self._gen[key], device=x.device).to(x.dtype)


def make_selector(name: str, dim: int, text_dim: int, hidden: int, form: str = "additive") -> Selector | None:
    if name == "tpd":
        return TPD(dim, text_dim, hidden, form)
    if name == "text_attn":
        return TextAttention(dim, text_dim)
    if name == "cls_attn":
        return ClsAttention()
    if name == "random":
        return RandomSelector()
    if name == "none":
        return None
    raise ValueError(f"unknown selector {name!r}; expected tpd, text_attn, cls_attn, random or none")


def tpd_scores(logits: Tensor) -> Tensor:
    """Selector logits -> scores in [0, 1] (TPD's sigmoid)."""
    return torch.sigmoid(logits.float())


def bce_patch_loss(logits: Tensor, labels: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Patch-Text Alignment loss: BCE between logits (B, N) and 0/1 labels (B, N), patch-averaged."""
    pw = torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)

"""Task heads: ITC projections + temperature, ITM, tied MLM / LM heads, grounding box head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from copa.model.layers import patch_centres


class ITCHead(nn.Module):
    """Projects image / text [CLS] states to a shared normalised space with a learnable temperature."""

    def __init__(self, img_dim: int, txt_dim: int, embed_dim: int, temperature: float) -> None:
        super().__init__()
        self.vision_proj = nn.Linear(img_dim, embed_dim)
        self.text_proj = nn.Linear(txt_dim, embed_dim)
        # shape (1,), not a scalar: FSDP cannot shard 0-d parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)))

    def image(self, cls: Tensor) -> Tensor:
        """(B, Dv) -> (B, E) unit vectors"""
        return F.normalize(self.vision_proj(cls).float(), dim=-1)

    def text(self, cls: Tensor) -> Tensor:
        """(B, Dt) -> (B, E) unit vectors"""
        return F.normalize(self.text_proj(cls).float(), dim=-1)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


class TiedLMHead(nn.Module):
    """BERT prediction head (dense, GELU, LayerNorm) whose output matrix is the word embedding.

    With an output vocabulary (``set_vocab``) only those rows are scored: the head's matmul and the
    softmax shrink from the whole vocabulary (30,522 words for BERT's) to the few hundred or thousand
    tokens a fine-tune's targets use. ``forward`` still answers in token ids (-inf elsewhere), for
    search; ``target_logits`` gives the compact form a loss needs.
    """

    def __init__(self, dim: int, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        self._embedding = [embedding]  # a list, so the tied weight is not registered twice
        # the config holds the list (it travels with the model); this copy follows ``to(device)``
        self.register_buffer("vocab", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_vocab(self, ids: list[int]) -> None:
        """Score only the token ids ``ids`` (sorted, distinct); empty: the whole vocabulary."""
        n = self.bias.shape[0]
        if ids and (ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= n):
            raise ValueError(f"an output vocabulary must be sorted distinct token ids in [0, {n})")
        self.vocab = torch.tensor(ids, dtype=torch.long, device=self.bias.device)

    def _scores(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., V') logits of the output vocabulary's tokens (V' = V when none is set)"""
        h = self.norm(F.gelu(self.dense(x)))
        weight, bias = self._embedding[0].weight, self.bias
        if self.vocab.numel():
            weight, bias = weight[self.vocab], bias[self.vocab]
        return F.linear(h, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits by token id; -inf for ids outside the output vocabulary"""
        z = self._scores(x)
        if not self.vocab.numel():
            return z
        full = z.new_full((*z.shape[:-1], self.bias.shape[0]), float("-inf"))
        return full.index_copy(-1, self.vocab, z)

    def target_logits(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D), token-id labels (...) -> (logits (..., V'), labels as positions among them).
        A label outside the output vocabulary becomes -1 (its log-probability is -inf); -100
        (ignored) stays -100."""
        if not self.vocab.numel():
            return self._scores(x), labels
        slots = torch.searchsorted(self.vocab, labels.clamp(min=0))
        found = self.vocab[slots.clamp(max=len(self.vocab) - 1)] == labels
        slots = torch.where(found, slots, torch.full_like(slots, -1))
        return self._scores(x), torch.where(labels == -100, labels, slots)


@dataclass
class GroundingOutput:
    """What the grounding head predicts for B (image, expression) pairs over K candidate patches.

    - ``box``: (B, 4) normalised (cx, cy, w, h), the box of the best-scoring patch;
    - ``scores``: (B, K) logits that patch k holds the centre of the referred object;
    - ``boxes``: (B, K, 4) the box each patch regresses;
    - ``centres``: (B, K, 2) normalised centre of each patch on the image.
    """

    box: Tensor
    scores: Tensor
    boxes: Tensor
    centres: Tensor


class PatchBoxHead(nn.Module):
    """Grounding head anchored on the kept patches (CenterNet-style).

    Every kept patch scores how likely it holds the centre of the referred object (a bilinear match
    of the fused text [CLS] with the patch's fused state) and regresses a box relative to its own
    centre: a centre offset of at most ``reach`` patches, width and height in (0, 1). The prediction
    is the box of the best-scoring patch. Why patches and not one regression from [CLS]: the TPD
    has already put the expression's object among the kept patches, so turning a per-patch decision
    into a box is a much easier problem than learning absolute coordinates from one pooled vector
    (BENCHMARKS.md, "Convergence on the tiny preset": acc@0.5 26% against 0% for a [CLS] regressor).
    The box also reads a 3x3 context of the patch's neighbours (``context`` channels; ModelConfig
    ``box_context``): with it, after the same 120 fine-tuning steps, validation acc@0.5 50 -> 62
    (BENCHMARKS.md, session 9). With ``relevance`` (``model.box_relevance``) a patch's score also
    adds the TPD's relevance of that patch, weighted per expression: where a fine-tune from the bare
    pre-training had found the box but not which object the words name, test acc@0.5 62.7 -> 85.5
    (BENCHMARKS.md, session 21).
    """

    def __init__(self, dim: int, reach: float = 1.5, context: int = 0, relevance: bool = False) -> None:
        super().__init__()
        self.reach = reach
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        # with ``relevance``: the weight of the TPD's relevance in each expression's patch scores
        self.prior: nn.Linear | None = None
        if relevance:
            self.add_relevance()
        # the box reads the patch and, with ``context`` > 0, a 3x3 convolution over the patch grid of
        # reduced states (dropped patches are zeros): how far the object extends is in the neighbours
        self.reduce = nn.Linear(dim, context) if context else None
        self.context = nn.Conv2d(context, context, 3, padding=1) if context else None
        self.box = nn.Sequential(nn.Linear(dim + context, dim), nn.GELU(), nn.Linear(dim, 4))

    def add_relevance(self) -> None:
        """Give the scores the TPD's relevance, weighted per expression by a linear read of the fused
        [CLS]; it starts at 1 for every expression (weight 0, bias 1), so the head first trusts the
        selector and learns where not to ("the leftmost object" names no kind to match)."""
        if self.prior is not None:
            return
        ref = self.query.weight
        self.prior = nn.Linear(self.query.in_features, 1).to(device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.prior.weight)
        nn.init.ones_(self.prior.bias)

    def forward(
        self, tokens: Tensor, text: Tensor, patch_index: Tensor, grid: int, relevance: Tensor | None = None
    ) -> GroundingOutput:
        """tokens: (B, K, D) fused patch states; text: (B, D) fused [CLS]; patch_index: (B, K)
        row-major index of each token's patch on a ``grid`` x ``grid`` map; relevance: (B, K) the
        TPD's standardised relevance of those patches, read with ``add_relevance`` (None: none)
        -> GroundingOutput"""
        d = tokens.shape[-1]
        scores = (self.query(text).unsqueeze(1) * self.key(tokens)).sum(-1).float() / math.sqrt(d)
        if self.prior is not None and relevance is not None:
            scores = scores + self.prior(text).float() * relevance.float()
        raw = self.box(self._with_context(tokens, patch_index, grid)).float()
        centres = patch_centres(patch_index, grid)
        xy = centres + torch.tanh(raw[..., :2]) * (self.reach / grid)
        boxes = torch.cat([xy, raw[..., 2:].sigmoid()], -1)
        best = scores.argmax(1)
        box = boxes.gather(1, best[:, None, None].expand(-1, 1, 4)).squeeze(1)
        return GroundingOutput(box, scores, boxes, centres)

    def _with_context(self, tokens: Tensor, patch_index: Tensor, grid: int) -> Tensor:
        """tokens (B, K, D) -> (B, K, D + C): each kept patch's state and its 3x3 grid context."""
        if self.reduce is None or self.context is None:
            return tokens
        b = tokens.shape[0]
        z = self.reduce(tokens).transpose(1, 2)  # (B, C, K)
        where = patch_index[:, None].expand(-1, z.shape[1], -1)
        plane = z.new_zeros(b, z.shape[1], grid * grid).scatter(2, where, z)
        ctx = F.gelu(self.context(plane.view(b, -1, grid, grid))).flatten(2).gather(2, where)
        return torch.cat([tokens, ctx.transpose(1, 2)], -1)

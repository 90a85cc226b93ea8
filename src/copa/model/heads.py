"""Task heads: ITC projections + temperature, ITM, tied MLM / LM heads, grounding box head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    """BERT prediction head (dense, GELU, LayerNorm) whose output matrix is the word embedding."""

    def __init__(self, dim: int, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        self._embedding = [embedding]  # a list, so the tied weight is not registered twice

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits"""
        h = self.norm(F.gelu(self.dense(x)))
        return F.linear(h, self._embedding[0].weight, self.bias)


class BoxHead(nn.Module):
    """Regresses a normalised (cx, cy, w, h) box from the fused [CLS]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, x: Tensor) -> Tensor:
        """(B, D) -> (B, 4) in [0, 1]"""
        return self.mlp(x).float().sigmoid()

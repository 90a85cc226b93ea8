"""mPLUG-style skip-connected fusion encoder.

Most layers are asymmetric co-attention: text self-attention, text cross-attends to the image
tokens, FFN; the image tokens pass through unchanged (cheap: no attention over the visual sequence).
Every ``stride``-th layer is connected attention: one self-attention over ``[image; text]``, and the
image part of its output is added back to the image stream as a residual.

Each visual token also gets where its patch sits on the grid (``PatchPosition``) as it enters the
fusion: in the demo's ITC-trained trunk the ViT's own position embedding does not survive to its
output tokens (a linear probe of left or right half from them: 0.54 against 0.53 majority;
BENCHMARKS.md, session 10), and after the selection the kept tokens' order says nothing of their
place either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from copa.model.layers import BertStyleLayer, patch_centres


class PatchPosition(nn.Module):
    """A patch's place on the grid as a learnt projection of fixed sin-cos features of its centre's
    normalised (x, y): ``features // 4`` octaves per axis from one period over the image, so "left
    half" is one direction from the first step and the same weights serve any grid size."""

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        if features < 4 or features % 4:
            raise ValueError(f"position features must be a positive multiple of 4, got {features}")
        self.octaves = features // 4
        self.proj = nn.Linear(features, dim)

    def forward(self, index: Tensor, grid: int) -> Tensor:
        """index (B, K) row-major patch indices on a ``grid`` x ``grid`` grid -> (B, K, dim)"""
        xy = patch_centres(index, grid)  # (B, K, 2) in (0, 1)
        # computed here in float32, not stored: a buffer would follow the model into bf16
        freqs = math.pi * 2.0 ** torch.arange(self.octaves, device=index.device, dtype=torch.float32)
        angles = (xy.unsqueeze(-1) * freqs).flatten(-2)  # (B, K, 2 * octaves)
        feats = torch.cat([angles.sin(), angles.cos()], -1)
        return self.proj(feats.to(self.proj.weight.dtype))


class FusionEncoder(nn.Module):
    def __init__(
        self, layers: int, stride: int, dim: int, heads: int, hidden: int, img_dim: int, position: int = 0
    ) -> None:
        super().__init__()
        self.pos = PatchPosition(position, dim) if position else None
        self.img_proj = nn.Identity() if img_dim == dim else nn.Linear(img_dim, dim)
        self.connected = [stride > 0 and (i + 1) % stride == 0 for i in range(layers)]
        self.layers = nn.ModuleList(
            BertStyleLayer(dim, heads, hidden, cross=not conn) for conn in self.connected
        )

    def forward(
        self, img: Tensor, txt: Tensor, txt_mask: Tensor, index: Tensor, grid: int
    ) -> tuple[Tensor, Tensor]:
        """img: (B, T, Dv) visual tokens = [CLS, K patches, (the dropped ones fused)]; txt: (B, L, D),
        txt_mask: (B, L); index: (B, K) the patches' places on the ``grid`` x ``grid`` grid
        -> ((B, T, D), (B, L, D))"""
        img = self.img_proj(img)
        if self.pos is not None:
            k = index.shape[1]
            img = torch.cat([img[:, :1], img[:, 1 : 1 + k] + self.pos(index, grid), img[:, 1 + k :]], 1)
        t = img.shape[1]
        img_mask = torch.ones(img.shape[:2], dtype=txt_mask.dtype, device=txt_mask.device)
        for conn, layer in zip(self.connected, self.layers, strict=True):
            if conn:
                z = layer(torch.cat([img, txt], 1), torch.cat([img_mask, txt_mask], 1))
                img, txt = img + z[:, :t], z[:, t:]
            else:
                txt = layer(txt, txt_mask, ctx=img)
        return img, txt

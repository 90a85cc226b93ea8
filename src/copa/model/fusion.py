"""mPLUG-style skip-connected fusion encoder.

Most layers are asymmetric co-attention: text self-attention, text cross-attends to the image
tokens, FFN; the image tokens pass through unchanged (cheap: no attention over the visual sequence).
Every ``stride``-th layer is connected attention: one self-attention over ``[image; text]``, and the
image part of its output is added back to the image stream as a residual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from copa.model.layers import BertStyleLayer


class FusionEncoder(nn.Module):
    def __init__(self, layers: int, stride: int, dim: int, heads: int, hidden: int, img_dim: int) -> None:
        super().__init__()
        self.img_proj = nn.Identity() if img_dim == dim else nn.Linear(img_dim, dim)
        self.connected = [stride > 0 and (i + 1) % stride == 0 for i in range(layers)]
        self.layers = nn.ModuleList(
            BertStyleLayer(dim, heads, hidden, cross=not conn) for conn in self.connected
        )

    def forward(self, img: Tensor, txt: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """img: (B, T, Dv) visual tokens; txt: (B, L, D), txt_mask: (B, L) -> ((B, T, D), (B, L, D))"""
        img = self.img_proj(img)
        t = img.shape[1]
        img_mask = torch.ones(img.shape[:2], dtype=txt_mask.dtype, device=txt_mask.device)
        for conn, layer in zip(self.connected, self.layers, strict=True):
            if conn:
                z = layer(torch.cat([img, txt], 1), torch.cat([img_mask, txt_mask], 1))
                img, txt = img + z[:, :t], z[:, t:]
            else:
                txt = layer(txt, txt_mask, ctx=img)
        return img, txt

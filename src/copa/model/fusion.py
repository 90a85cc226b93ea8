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

With ``relevance`` each kept token also gets how well its patch matches the text by the model's own
first TPD (``VisionOutput.relevance``): a learnt direction scaled by the standardised selector logit.
PTA taught the selector which patches a phrase names; without this the fusion must find them again
from the tokens alone, and VQA's "is there a red diamond?" stayed at chance (BENCHMARKS.md, sessions
11-12). With ``relevance_token`` as well, the kept tokens averaged by that relevance
(``RelevanceToken``) join the visual sequence as one more token: what the text points at, ready to read
without first learning to attend to it (BENCHMARKS.md, session 17).
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


def relevance_projection(dim: int) -> nn.Linear:
    """Scalar relevance -> (dim,) added to a visual token. Initialised N(0, 0.3), bias 0: read within
    the demo's 125 VQA steps (at N(0, 0.02) "is there" stayed at chance; at PyTorch's default +-1 "left
    or right?" fell to chance in one seed: BENCHMARKS.md, session 11)."""
    proj = nn.Linear(1, dim)
    nn.init.normal_(proj.weight, std=0.3)
    nn.init.zeros_(proj.bias)
    return proj


class RelevanceToken(nn.Module):
    """The kept tokens averaged with weights softmax(s * relevance), plus a learnt type vector that
    tells it from a patch. ``s`` is learnt, from 2: on standardised relevance the object the text
    names (~2-3 standard deviations above the image's mean) then carries most of the weight."""

    def __init__(self, dim: int, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.kind = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: Tensor, relevance: Tensor) -> Tensor:
        """tokens (B, K, D), relevance (B, K) -> (B, 1, D)"""
        w = torch.softmax(relevance.float() * self.scale.float(), -1).to(tokens.dtype)
        return (w.unsqueeze(-1) * tokens).sum(1, keepdim=True) + self.kind.to(tokens.dtype)


class FusionEncoder(nn.Module):
    def __init__(
        self,
        layers: int,
        stride: int,
        dim: int,
        heads: int,
        hidden: int,
        img_dim: int,
        position: int = 0,
        relevance: bool = False,
        relevance_token: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.pos = PatchPosition(position, dim) if position else None
        self.rel = relevance_projection(dim) if relevance else None
        if relevance_token and not relevance:
            raise ValueError("the relevance token needs the fusion's relevance (relevance=True)")
        self.pool = RelevanceToken(dim) if relevance_token else None
        self.img_proj = nn.Identity() if img_dim == dim else nn.Linear(img_dim, dim)
        self.connected = [stride > 0 and (i + 1) % stride == 0 for i in range(layers)]
        self.layers = nn.ModuleList(
            BertStyleLayer(dim, heads, hidden, cross=not conn) for conn in self.connected
        )

    def add_relevance(self, token: bool = False) -> None:
        """Give a fusion built without ``relevance`` its projection, and with ``token`` its relevance
        token (a fine-tune that adds them)."""
        ref = next(self.parameters())
        if self.rel is None:
            self.rel = relevance_projection(self.dim).to(device=ref.device, dtype=ref.dtype)
        if token and self.pool is None:
            self.pool = RelevanceToken(self.dim).to(device=ref.device, dtype=ref.dtype)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        txt_mask: Tensor,
        index: Tensor,
        grid: int,
        relevance: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """img: (B, T, Dv) visual tokens = [CLS, K patches, (the dropped ones fused)]; txt: (B, L, D),
        txt_mask: (B, L); index: (B, K) the patches' places on the ``grid`` x ``grid`` grid; relevance
        (B, K) of those patches (standardised; None: all 0), read when the fusion has its projection
        -> ((B, T', D), (B, L, D)), T' = T + 1 with the relevance token (last)"""
        img = self.img_proj(img)
        k = index.shape[1]
        extra = self.pos(index, grid) if self.pos is not None else None
        if self.rel is not None:
            if relevance is None:  # no text to select by: every patch at the image's mean relevance, 0
                relevance = torch.zeros(index.shape, device=img.device)
            r = self.rel(relevance.unsqueeze(-1).to(self.rel.weight.dtype))
            extra = r if extra is None else extra + r
        if extra is not None:
            img = torch.cat([img[:, :1], img[:, 1 : 1 + k] + extra.to(img.dtype), img[:, 1 + k :]], 1)
        if self.pool is not None and relevance is not None:  # (relevance is set whenever rel is)
            img = torch.cat([img, self.pool(img[:, 1 : 1 + k], relevance)], 1)
        t = img.shape[1]
        img_mask = torch.ones(img.shape[:2], dtype=txt_mask.dtype, device=txt_mask.device)
        for conn, layer in zip(self.connected, self.layers, strict=True):
            if conn:
                z = layer(torch.cat([img, txt], 1), torch.cat([img_mask, txt_mask], 1))
                img, txt = img + z[:, :t], z[:, t:]
            else:
                txt = layer(txt, txt_mask, ctx=img)
        return img, txt

"""The parts ``copa.export`` traces, as modules: each holds only the submodules it runs, so its saved
program carries only their weights (which is why they live here, beside the model, and not in the
exporter). Shapes: see ``copa.export``."""

from __future__ import annotations

from torch import Tensor, nn

from copa.model.copa import COPAModel
from copa.model.text import pool_text


class ImagePrefix(nn.Module):
    """The text-independent ViT blocks (``COPAModel.image_prefix``)."""

    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.vision = model.vision

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> prefix (B, 1+N, Dv)"""
        return self.vision.forward_prefix(images)


class TextEncoder(nn.Module):
    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.text, self.itc, self.pooling = model.text, model.itc, model.cfg.text.pooling

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids, mask (B, L) -> text states (B, L, Dt), pooled query (B, Dt), ITC embedding (B, E)"""
        txt = self.text(ids, mask)
        query = pool_text(txt, mask, self.pooling)
        return txt, query, self.itc.text(query)


class VisionSuffix(nn.Module):
    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.vision = model.vision

    def forward(self, prefix: Tensor, query: Tensor) -> tuple[Tensor, ...]:
        """prefix (B, 1+N, Dv), query (B, Dt) -> tokens (B, T, Dv), kept patch indices (B, K), and
        for a model whose fusion or box head reads it (``model.fusion.relevance``,
        ``model.box_relevance``) their relevance (B, K)"""
        vis = self.vision.forward_suffix(prefix, query)
        if vis.relevance is not None:
            return vis.tokens, vis.patch_index, vis.relevance
        return vis.tokens, vis.patch_index


class VisionAgnostic(nn.Module):
    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.vision, self.itc = model.vision, model.itc

    def forward(self, prefix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """prefix (B, 1+N, Dv) -> tokens (B, T, Dv), kept (B, K), ITC image embedding (B, E)"""
        vis = self.vision.forward_suffix(prefix, None)
        return vis.tokens, vis.patch_index, self.itc.image(vis.cls)


class Fusion(nn.Module):
    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.fusion = model.fusion
        self.grid = model.cfg.vision.image_size // model.cfg.vision.patch_size

    def forward(
        self, tokens: Tensor, txt: Tensor, mask: Tensor, kept: Tensor, relevance: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """tokens (B, T, Dv), text states (B, L, Dt), mask (B, L), kept (B, K), relevance (B, K) (an
        input of this part only for a model whose fusion reads it) -> fused image (B, T, Dt), text
        (B, L, Dt)"""
        return self.fusion(tokens, txt, mask, kept, self.grid, relevance)


class Heads(nn.Module):
    def __init__(self, model: COPAModel) -> None:
        super().__init__()
        self.itm, self.box_head = model.itm, model.box_head
        self.grid = model.cfg.vision.image_size // model.cfg.vision.patch_size

    def forward(
        self, fused_image: Tensor, fused_cls: Tensor, kept: Tensor, relevance: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """fused image (B, T, Dt), fused [CLS] (B, Dt) = ``fused_text[:, 0]``, kept (B, K), relevance
        (B, K) (an input of this part only for a model whose box head reads it) -> ITM logits (B, 2),
        box (B, 4) normalised cxcywh, per-patch box scores (B, K)"""
        g = self.box_head(fused_image[:, 1 : 1 + kept.shape[1]], fused_cls, kept, self.grid, relevance)
        return self.itm(fused_cls), g.box, g.scores

"""Box operations for visual grounding: format conversion, IoU and generalised IoU (GIoU).

All functions are *paired* (row i of ``a`` with row i of ``b``), which is what a grounding head
needs (one predicted box per referring expression); boxes are ``(..., 4)`` float tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """(..., 4) centre-x, centre-y, width, height -> (..., 4) x0, y0, x1, y1"""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """(..., 4) x0, y0, x1, y1 -> (..., 4) centre-x, centre-y, width, height"""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _area(b: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...,); degenerate (inverted) boxes have area 0."""
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Paired IoU. a, b: (..., 4) xyxy -> (...,) in [0, 1]"""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=eps)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Paired GIoU = IoU - (|C| - |A ∪ B|) / |C|, C the smallest box enclosing both.

    a, b: (..., 4) xyxy -> (...,) in [-1, 1]. Differentiable everywhere the boxes have area, so
    ``1 - GIoU`` is a loss that still pulls non-overlapping boxes together (plain IoU is flat at 0).
    """
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    enclose = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclose - union) / enclose.clamp(min=eps)

"""Box → patch labels for Patch-Text Alignment (SPEC §2).

Patch ``i`` is positive for a box if the box covers at least ``tau`` of the patch's area, or if the
patch contains the box centre (so no box, however small, is lost). Patches are numbered row-major,
``i = row * grid_w + col``, which is the order of ``conv_patch_embed(x).flatten(2)`` in a ViT.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_size(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(grid_h, grid_w) of a ViT with a stride-``patch_size`` conv embedding (the remainder is cut)."""
    return image_size[0] // patch_size, image_size[1] // patch_size


def box_to_patch_labels(
    boxes_xywh: Tensor, image_size: tuple[int, int], patch_size: int, tau: float = 0.25
) -> Tensor:
    """Patch labels of each box.

    Args:
        boxes_xywh: (M, 4) boxes ``(x, y, w, h)`` in pixels of the final (model-size) image.
        image_size: (H, W) of that image.
        patch_size: side of a square patch in pixels.
        tau: minimum share of a patch's area the box must cover.

    Returns:
        (M, N) float32 0/1 labels, ``N = (H // patch) * (W // patch)``, row-major.

    The centre patch is ``floor(centre / patch)`` clamped to the grid, so a centre on a patch edge
    or corner picks exactly one patch (the one below/right of it) and a centre on the image's far
    edge picks the last row/column. Overlap is computed in float64 so ``tau`` boundaries are exact.
    An overlap of zero never counts (relevant only for ``tau == 0``).
    """
    gh, gw = grid_size(image_size, patch_size)
    b = boxes_xywh.detach().to(torch.float64).reshape(-1, 4)
    m = b.shape[0]
    if m == 0:
        return torch.zeros(0, gh * gw, dtype=torch.float32)
    p = float(patch_size)
    x0, y0 = b[:, 0:1], b[:, 1:2]
    x1, y1 = x0 + b[:, 2:3], y0 + b[:, 3:4]
    cols = torch.arange(gw, dtype=torch.float64) * p  # patch left edges
    rows = torch.arange(gh, dtype=torch.float64) * p  # patch top edges
    ox = (torch.minimum(x1, cols + p) - torch.maximum(x0, cols)).clamp(min=0)  # (M, gw)
    oy = (torch.minimum(y1, rows + p) - torch.maximum(y0, rows)).clamp(min=0)  # (M, gh)
    overlap = oy[:, :, None] * ox[:, None, :]  # (M, gh, gw)
    pos = (overlap >= tau * p * p) & (overlap > 0)
    cr = torch.floor((y0 + y1)[:, 0] / 2 / p).long().clamp(0, gh - 1)
    cc = torch.floor((x0 + x1)[:, 0] / 2 / p).long().clamp(0, gw - 1)
    pos[torch.arange(m), cr, cc] = True
    return pos.reshape(m, gh * gw).to(torch.float32)


def union_labels(labels: Tensor, num_patches: int) -> Tensor:
    """(M, N) per-box labels → (N,) union (all zeros when M == 0)."""
    if labels.shape[0] == 0:
        return torch.zeros(num_patches, dtype=torch.float32)
    return labels.amax(dim=0)

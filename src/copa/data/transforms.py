"""Image + box transforms that move boxes exactly with the pixels.

Coordinates are continuous pixel-edge coordinates: pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``.
PIL's ``resize(box=...)`` maps the crop rectangle onto the output grid with the same convention, so a
crop + resize is the affine map ``x' = (x - x0) · W_out / crop_w`` for pixels and boxes alike, and a
horizontal flip is ``x' = W - x - w``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# "left"/"right" as a word or with a directional suffix ("leftmost", "right-hand"); "bright",
# "copyright", "leftover" and "righteous" are left alone.
_LR = re.compile(r"\b(left|right)(?=(?:most|ward|wards|-hand|hand)?\b)", re.IGNORECASE)


def _swap(m: re.Match[str]) -> str:
    word = m.group(1)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return new.upper()
    if word[0].isupper():
        return new.capitalize()
    return new


def swap_left_right(text: str) -> str:
    """Swap "left" ↔ "right" (keeping case) so a text still describes a horizontally flipped image."""
    return _LR.sub(_swap, text)


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h) covering ``scale`` of the area with aspect ratio in ``ratio``.

    Same sampling as torchvision's RandomResizedCrop (10 tries, then a centre crop clamped to the
    ratio range), drawn from ``rng`` so a seeded generator reproduces it.
    """
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_boxes(
    boxes: np.ndarray, crop: tuple[float, float, float, float], min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to a crop and express them in the crop's coordinates.

    Args:
        boxes: (M, 4) xywh in the source image.
        crop: (x0, y0, w, h) of the crop in the source image.
        min_visible: drop a box whose visible area is below this share of its own area.

    Returns:
        (M, 4) clipped boxes in crop coordinates, (M,) bool keep mask.
    """
    x0, y0, cw, ch = crop
    bx0 = np.clip(boxes[:, 0], x0, x0 + cw)
    by0 = np.clip(boxes[:, 1], y0, y0 + ch)
    bx1 = np.clip(boxes[:, 0] + boxes[:, 2], x0, x0 + cw)
    by1 = np.clip(boxes[:, 1] + boxes[:, 3], y0, y0 + ch)
    vis = (bx1 - bx0) * (by1 - by0)
    area = boxes[:, 2] * boxes[:, 3]
    keep = (vis > 0) & (vis >= min_visible * area)
    out = np.stack([bx0 - x0, by0 - y0, bx1 - bx0, by1 - by0], axis=1)
    return out, keep


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """(M, 4) xywh → the same boxes in the horizontally flipped image of ``width``."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 0] - boxes[:, 2]
    return out


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """RGB PIL image → (3, H, W) float32, normalised with ``mean``/``std`` (0–1 scale)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


@dataclass
class Augmented:
    """Result of ``ImageBoxTransform``: ``image`` (3,H,W) normalised, ``boxes`` (M,4) xywh px of
    the output image, ``keep`` (M,) which input boxes survived, ``flipped`` whether texts must swap."""

    image: Tensor
    boxes: np.ndarray
    keep: np.ndarray
    flipped: bool


@dataclass
class ImageBoxTransform:
    """Training: random resized crop → resize to ``image_size`` → random h-flip → normalise.
    Evaluation: resize the whole image to ``image_size`` (aspect not kept, as ALBEF/mPLUG) → normalise.

    ``image_size`` is (H, W). Boxes are (M, 4) xywh in source pixels; those whose visible share
    after the crop is below ``min_visible`` are dropped (``keep`` is False for them).
    """

    image_size: tuple[int, int]
    train: bool
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    min_visible: float = 0.3
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __call__(self, img: Image.Image, boxes: np.ndarray, rng: np.random.Generator) -> Augmented:
        H, W = self.image_size
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.train:
            crop = random_resized_crop_params(img.width, img.height, self.crop_scale, self.crop_ratio, rng)
        else:
            crop = (0, 0, img.width, img.height)
        x0, y0, cw, ch = crop
        out = img.resize((W, H), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        cropped, keep = crop_boxes(boxes, crop, self.min_visible if self.train else 0.0)
        scaled = cropped * np.array([W / cw, H / ch, W / cw, H / ch])
        flipped = bool(self.train and rng.random() < self.hflip)
        if flipped:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scaled = hflip_boxes(scaled, W)
        return Augmented(to_tensor(out, self.mean, self.std), scaled, keep, flipped)

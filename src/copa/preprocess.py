"""From PIL images, paths or bytes and plain strings to model inputs, with the checkpoint's own settings.

The image transform is the evaluation transform of the data pipeline (``ImageBoxTransform`` with
``train=False``), built from ``model.vision.image_size`` and ``model.preprocess`` — both saved with
the model — so a prediction sees exactly the input an evaluation saw. The tokenizer is the one saved
beside the weights, truncating at ``model.text.max_len`` as the collator does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from copa.config import ModelConfig
from copa.data.image_io import ImageError, ImageInput, open_image  # re-exported: the API's image types
from copa.data.transforms import ImageBoxTransform


@dataclass
class ImageTransform:
    """RGB PIL image -> (3, H, W) float32: whole image resized to ``image_size`` square (bicubic),
    normalised with ``mean`` / ``std``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ImageTransform:
        return cls(cfg.vision.image_size, tuple(cfg.preprocess.mean), tuple(cfg.preprocess.std))

    def __call__(self, img: Image.Image) -> Tensor:
        s = self.image_size
        tf = ImageBoxTransform((s, s), train=False, mean=self.mean, std=self.std)
        return tf(img, np.zeros((0, 4)), np.random.default_rng(0)).image

    def batch(self, images: Sequence[Image.Image]) -> Tensor:
        """B RGB PIL images -> (B, 3, H, W)."""
        return torch.stack([self(im) for im in images])


class Tokenizer:
    """Strings -> (ids, mask), both (B, L) long, padded to the longest, at most ``max_len`` tokens
    (``[CLS] ... [SEP]``), exactly as the evaluation collator tokenizes."""

    def __init__(self, name: str, max_len: int) -> None:
        from copa.data.collate import Collator

        self.name, self.max_len = name, max_len
        self._collator = Collator(name, max_len)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Tokenizer:
        return cls(cfg.text.tokenizer, cfg.text.max_len)

    @property
    def hf(self) -> Any:
        """The underlying ``transformers`` tokenizer."""
        from copa.model.text import load_tokenizer

        return load_tokenizer(self.name)

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        return self._collator.tokenize([texts] if isinstance(texts, str) else list(texts))


__all__ = ["ImageError", "ImageInput", "ImageTransform", "Tokenizer", "open_image"]

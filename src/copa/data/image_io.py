"""Image input, the one place images are opened, checked and decoded as RGB, every failure typed.

``check_image`` reads only the header (cheap: no pixel decode); ``load_image`` decodes a record's
image; ``open_image`` decodes what the inference API takes (a PIL image, a path or bytes). All raise
``ImageError`` whose ``kind`` is the bad-input kind the caller counts (``copa.data.badinput``).

The size limits (``min_image_side``, ``max_image_side``) live only in ``DataConfig``: every function
takes the config, and without one uses the library default ``DataConfig()`` (what inference uses).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from copa.config import DataConfig
from copa.data.records import Record

ImageInput = Image.Image | str | Path | bytes
"""An image as the high-level API takes it: a PIL image, a file path, or encoded bytes."""


class ImageError(Exception):
    """An image that cannot be used; ``kind`` is one of the SKIP kinds of ``copa.data.badinput``."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg = kind, msg

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across DataLoader workers
        return ImageError, (self.kind, self.msg)


def _open(rec: Record) -> Image.Image:
    src: Any = io.BytesIO(rec.data) if rec.data is not None else rec.image
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x PIL's pixel limit PIL only warns; we downscale those anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(src)
    except FileNotFoundError as e:
        raise ImageError("missing_file", str(rec.image)) from e
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", f"{rec.image}: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt_file", f"{rec.image}: {e}") from e


def _check_size(size: tuple[int, int], rec: Record, cfg: DataConfig) -> None:
    """``size`` (W, H) against the config's limits; a huge image passes (it is downscaled)."""
    min_side, max_side = cfg.min_image_side, cfg.max_image_side
    if min(size) < min_side:
        raise ImageError("tiny_image", f"{rec.image}: {size[0]}x{size[1]}")
    if max(size) > max_side and min(size) * max_side / max(size) < min_side:
        # a sliver: downscaling the long side to max_side leaves the short one below min_side
        raise ImageError("thin_image", f"{rec.image}: {size[0]}x{size[1]} (max side {max_side})")


def _decode_error(e: Exception, rec: Record) -> ImageError:
    kind = "truncated_image" if "truncat" in str(e).lower() else "corrupt_file"
    return ImageError(kind, f"{rec.image}: {e}")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Single-channel 16/32-bit integer or float image → 8-bit ``L``, scaled, not clipped.

    PIL's own ``convert`` clips such values at 255, which turns a 16-bit grayscale PNG white.
    """
    arr = np.asarray(im, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if im.mode.startswith("I;16") or peak > 255:
        arr = arr / 257.0  # 65535 -> 255
    elif im.mode == "F" and peak <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; transparency is composited over white (not dropped: hidden pixels of
    transparent regions are often garbage); 16-bit and float grayscale are scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass
class Loaded:
    """A decoded RGB image; ``scale`` (sx, sy) maps boxes in ``orig_size`` pixels onto ``image``."""

    image: Image.Image
    orig_size: tuple[int, int]
    scale: tuple[float, float]
    repairs: list[str]


def load_image(rec: Record, cfg: DataConfig | None = None) -> Loaded:
    """Decode a record's image as RGB, at most ``cfg.max_image_side`` pixels per side (a larger
    JPEG is decoded in draft mode, at 1/2^k scale, so a huge file stays cheap).

    ``repairs`` of the result lists the REPAIR kinds applied (non-RGB, huge).

    Raises:
        ImageError: the image cannot be used (kind says why).
    """
    cfg = cfg or DataConfig()
    max_side = cfg.max_image_side
    im = _open(rec)
    repairs: list[str] = []
    try:
        orig = im.size
        _check_size(orig, rec, cfg)
        if max(orig) > max_side:
            repairs.append("huge_image")
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at a reduced scale: cheap
        if im.mode != "RGB":
            repairs.append("non_rgb_converted")
        try:
            im.load()
            out = to_rgb(im)
        except Exception as e:  # PIL raises many exception types for broken data
            raise _decode_error(e, rec) from e
    except BaseException:
        im.close()
        raise
    if out is not im:
        im.close()
    if max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return Loaded(out, orig, (out.width / orig[0], out.height / orig[1]), repairs)


def check_image(
    rec: Record, cfg: DataConfig | None = None, decode: bool = False
) -> tuple[int, int, list[str]]:
    """Header check (``decode=True``: full decode too). Returns (width, height, repairs to come)."""
    cfg = cfg or DataConfig()
    if decode:
        ld = load_image(rec, cfg)
        ld.image.close()
        return ld.orig_size[0], ld.orig_size[1], ld.repairs
    with _open(rec) as im:
        _check_size(im.size, rec, cfg)
        repairs = ["huge_image"] if max(im.size) > cfg.max_image_side else []
        if im.mode != "RGB":
            repairs.append("non_rgb_converted")
        return im.width, im.height, repairs


def open_image(src: ImageInput, cfg: DataConfig | None = None) -> Image.Image:
    """Any ``ImageInput`` -> RGB PIL image, decoded like training data (16-bit, palette, alpha and
    huge images as ``load_image`` handles them), under ``cfg``'s limits (default: the library's).

    Raises:
        ImageError: unreadable, truncated, tiny or otherwise unusable (``kind`` says which).
    """
    cfg = cfg or DataConfig()
    if isinstance(src, Image.Image):
        if min(src.size) < cfg.min_image_side:
            raise ImageError("tiny_image", f"{src.width}x{src.height}")
        im = to_rgb(src)
        if max(im.size) > cfg.max_image_side:
            im = im.copy() if im is src else im  # never resize the caller's image in place
            im.thumbnail((cfg.max_image_side, cfg.max_image_side), Image.Resampling.BICUBIC)
        return im
    if isinstance(src, bytes):
        return load_image(Record("<bytes>", data=src), cfg).image
    return load_image(Record(str(src)), cfg).image

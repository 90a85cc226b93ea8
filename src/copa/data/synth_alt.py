"""A second scene style, for evaluation only: the same words, a look the training generator never
produces.

The main generator (``copa.data.synth``) draws upright filled shapes in eight fixed shades on a
blotchy textured background, 1–4 objects, 128 px. A model trained on it could have learnt that look
rather than the concepts, so this style changes everything but the vocabulary (the questions stay
answerable and the phrases stay queryable):

- backgrounds: linear gradients, low-contrast stripes or checkerboards, darker and lighter tones;
- colours: other shades of the same eight colour names (e.g. crimson for "red", teal for "cyan");
- shapes: the same eight names, rotated by up to ±20° (more would turn a square into a diamond) and
  drawn with a dark outline;
- object sizes outside the training ranges, one to five objects, images of 96, 160 or 192 px.

``write_synth_alt(out, ...)`` writes ``out/test.json``, ``out/annotations/*_test.json`` and
``out/images/test/*.png`` (every box kept), readable wherever the main set's test split is.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from copa.data.records import Record
from copa.data.synth import (
    SceneObj,
    _dump,
    coco_dicts,
    place_objects,
    png_writer,
    scene_record,
    shape_mask,
)

log = logging.getLogger(__name__)

ALT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (170, 20, 55),  # crimson
    "green": (110, 200, 60),  # lime
    "blue": (25, 50, 150),  # navy
    "yellow": (245, 235, 120),  # lemon
    "purple": (185, 110, 225),  # lavender
    "orange": (205, 100, 20),  # burnt orange
    "cyan": (20, 150, 160),  # teal
    "pink": (250, 90, 150),  # hot pink
}
ALT_SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.27, 0.32)}
IMAGE_SIZES = (96, 160, 192)
MAX_TILT_DEG = 20.0


def alt_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float background: a gradient, stripes or a checkerboard, plus pixel noise."""
    kind = ("gradient", "stripes", "checker")[int(rng.integers(3))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    a = rng.uniform(60, 200) + rng.uniform(-15, 15, size=3)
    if kind == "gradient":
        b = np.clip(a + rng.uniform(-70, 70), 30, 225) + rng.uniform(-15, 15, size=3)
        ang = rng.uniform(0, 2 * np.pi)
        t = np.cos(ang) * xx + np.sin(ang) * yy
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        img = a + (b - a) * t[..., None]
    elif kind == "stripes":
        period = rng.uniform(0.06, 0.2)
        ang = rng.uniform(0, np.pi)
        phase = (np.cos(ang) * xx + np.sin(ang) * yy) / period
        img = a + rng.uniform(10, 22) * np.sign(np.sin(2 * np.pi * phase))[..., None]
    else:
        cells = int(rng.integers(4, 12))
        chk = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2 - 1
        img = a + rng.uniform(10, 22) * chk[..., None]
    return img + rng.normal(0.0, 6.0, size=(size, size, 3))


def tilted_mask(shape: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """(s, s) bool mask of ``shape`` rotated by up to ±``MAX_TILT_DEG`` (canvas grown to fit)."""
    base = Image.fromarray(shape_mask(shape, side).astype(np.uint8) * 255)
    angle = 0.0 if shape in ("circle", "ring") else rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)
    return np.asarray(base.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)) > 127


def render_alt_scene(
    specs: list[tuple[str, str, str, float, float]], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[SceneObj]]:
    """Draw ``(shape, colour, size_name, cx, cy)`` objects in the alternative style.

    Returns:
        (size, size, 3) uint8 image, the objects with tight boxes of their full masks.
    """
    img = alt_background(size, rng)
    objs = []
    for shape, colour, sname, cx, cy in specs:
        lo, hi = ALT_SIZES[sname]
        mask = tilted_mask(shape, max(5, round(rng.uniform(lo, hi) * size)), rng)
        s = mask.shape[0]
        x0 = int(np.clip(round(cx - s / 2), 0, size - s))
        y0 = int(np.clip(round(cy - s / 2), 0, size - s))
        # a 1-2 px dark outline: the mask dilated, minus the mask
        grow = 3 if s < 24 else 5
        outline = (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(grow))) > 127
        )
        outline &= ~mask
        rgb = np.asarray(ALT_COLOURS[colour], dtype=np.float64) + rng.uniform(-10, 10, size=3)
        region = img[y0 : y0 + s, x0 : x0 + s]
        region[outline] = rng.uniform(15, 45)
        region[mask] = rgb + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
        ys, xs = np.nonzero(mask | outline)
        box = (
            float(x0 + xs.min()),
            float(y0 + ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        )
        objs.append(SceneObj(shape, colour, sname, box))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objs


def sample_alt_specs(size: int, rng: np.random.Generator) -> list[tuple[str, str, str, float, float]]:
    """1–5 objects with distinct (colour, shape), overlapping at most 15% of the smaller box; a
    tilted shape's canvas is up to ~1.2x wider than the shape."""
    return place_objects(
        size, rng, 5, ALT_COLOURS, ALT_SIZES, large_share=0.35, max_overlap=0.15, tries=30, canvas=1.2
    )


def make_alt_scene(rng: np.random.Generator) -> tuple[np.ndarray, Record]:
    """One random scene of the alternative style: (S, S, 3) uint8 image and its record."""
    size = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    img, objs = render_alt_scene(sample_alt_specs(size, rng), size, rng)
    return img, scene_record(objs, size, rng)


def write_synth_alt(out: str | Path, seed: int = 0, n_test: int = 60) -> dict[str, Any]:
    """Write ``n_test`` scenes of the alternative style as a test split (layout in the module
    docstring). Returns a JSON-able summary."""
    t0 = time.perf_counter()
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images" / "test").mkdir(parents=True, exist_ok=True)
    # a different stream from the main generator's for the same seed
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA17]))
    records = []
    with png_writer() as write:
        for i in range(n_test):
            img, rec = make_alt_scene(rng)
            rec.image, rec.image_id = f"images/test/{i:06d}.png", i
            write(img, out / rec.image)
            records.append(rec)
    _dump([r.to_dict() for r in records], out / "test.json")
    caps, inst = coco_dicts(records, "test", seed)
    _dump(caps, out / "annotations" / "captions_test.json")
    _dump(inst, out / "annotations" / "instances_test.json")
    summary = {
        "style": "alt",
        "seed": seed,
        "test": {"images": n_test, "with_boxes": sum(bool(r.objects) for r in records)},
        "objects_per_image": {str(k): sum(len(r.objects) == k for r in records) for k in range(1, 6)},
        "image_sizes": {str(s): sum(r.width == s for r in records) for s in IMAGE_SIZES},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("alternative-style scenes: %s", summary)
    return summary

"""Embedded synthetic scenes: coloured shapes on a textured background, with captions, boxes,
VQA pairs and referring expressions. Deterministic: the same seed gives byte-identical files.

Layout of ``write_synth(out, ...)``::

    out/train.json val.json test.json          JSON record lists (image paths relative to out/)
    out/train_all_boxes.json                   the training images with every box kept (ablation)
    out/annotations/captions_{split}.json      COCO captions
    out/annotations/instances_{split}.json     COCO instances (category = shape; "phrase" = full)
    out/images/{split}/{index:06d}.png

Boxes (objects) are kept on ``box_share`` of the training images only (SPEC §3); validation and
test keep all. Referring expressions keep their boxes everywhere (they are grounding labels, not
PTA labels).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from copa.data.records import QA, Obj, Record, Ref

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (230, 205, 50),
    "purple": (140, 60, 185),
    "orange": (240, 135, 35),
    "cyan": (50, 195, 205),
    "pink": (235, 125, 180),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "large": (0.21, 0.27)}  # side / image
NUMBERS = ("zero", "one", "two", "three", "four", "five")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SceneObj:
    """One drawn object; ``box`` is its tight pixel box (x, y, w, h) in the scene."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


def _polygon(shape: str, s: float) -> list[tuple[float, float]] | None:
    c, r = s / 2, s / 2 - 0.5
    if shape == "triangle":
        return [(c, c - r), (c + r, c + r), (c - r, c + r)]
    if shape == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return list(zip(c + rad * np.cos(ang), c + rad * np.sin(ang), strict=True))
    if shape == "hexagon":
        ang = np.arange(6) * np.pi / 3
        return list(zip(c + r * np.cos(ang), c + r * np.sin(ang), strict=True))
    if shape == "cross":
        t = r / 3
        return [
            (c - t, c - r),
            (c + t, c - r),
            (c + t, c - t),
            (c + r, c - t),
            (c + r, c + t),
            (c + t, c + t),
            (c + t, c + r),
            (c - t, c + r),
            (c - t, c + t),
            (c - r, c + t),
            (c - r, c - t),
            (c - t, c - t),
        ]
    return None


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling its square canvas."""
    im = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(im)
    poly = _polygon(shape, side)
    if poly is not None:
        d.polygon(poly, fill=255)
    elif shape == "square":
        m = max(1, round(side * 0.08))
        d.rectangle((m, m, side - 1 - m, side - 1 - m), fill=255)
    elif shape in ("circle", "ring"):
        d.ellipse((0, 0, side - 1, side - 1), fill=255)
        if shape == "ring":
            t = max(2, round(side * 0.22))
            d.ellipse((t, t, side - 1 - t, side - 1 - t), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(im) > 0


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float: a desaturated base tone, a smooth blotchy texture and pixel noise —
    low contrast so objects stand out, but their edges are not trivially clean."""
    base = rng.uniform(95, 160) + rng.uniform(-12, 12, size=3)
    low = rng.normal(0.0, 16.0, size=(6, 6, 3))
    tex = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(low[:, :, k], dtype=np.float32)).resize(
                    (size, size), Image.Resampling.BICUBIC
                )
            )
            for k in range(3)
        ],
        -1,
    )
    return base + tex + rng.normal(0.0, 9.0, size=(size, size, 3))


def render_scene(
    specs: list[tuple[str, str, str, float, float]], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[SceneObj]]:
    """Draw objects ``(shape, colour, size_name, cx, cy)`` (centres in pixels) in order, later on top.

    Returns:
        (size, size, 3) uint8 image, the objects with tight boxes of their full (amodal) masks.
    """
    img = background(size, rng)
    objs = []
    for shape, colour, sname, cx, cy in specs:
        lo, hi = SIZES[sname]
        side = max(4, round(rng.uniform(lo, hi) * size))
        x0 = int(np.clip(round(cx - side / 2), 0, size - side))
        y0 = int(np.clip(round(cy - side / 2), 0, size - side))
        mask = shape_mask(shape, side)
        ys, xs = np.nonzero(mask)
        rgb = np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-12, 12, size=3)
        region = img[y0 : y0 + side, x0 : x0 + side]
        fill = 0.85 * rgb + 0.15 * region + rng.normal(0.0, 7.0, size=region.shape)
        region[mask] = fill[mask]
        box = (
            float(x0 + xs.min()),
            float(y0 + ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        )
        objs.append(SceneObj(shape, colour, sname, box))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objs


def _overlap_share(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def sample_specs(size: int, rng: np.random.Generator) -> list[tuple[str, str, str, float, float]]:
    """1–4 objects with distinct (colour, shape); overlaps allowed up to 25% of the smaller box so
    every object stays recognisable and the spatial words stay true."""
    return place_objects(size, rng, 4, COLOURS, SIZES, large_share=0.4, max_overlap=0.25, tries=20)


def place_objects(
    size: int,
    rng: np.random.Generator,
    max_objects: int,
    colours: dict[str, Any],
    sizes: dict[str, tuple[float, float]],
    large_share: float,
    max_overlap: float,
    tries: int,
    canvas: float = 1.0,
) -> list[tuple[str, str, str, float, float]]:
    """1..``max_objects`` (shape, colour, size name, cx, cy) with distinct (colour, shape), each box
    (``sizes[name][1] * size * canvas`` wide) overlapping the others by at most ``max_overlap`` of the
    smaller; an object that finds no place in ``tries`` draws is left out. Both scene styles place
    their objects this way (the draws, in this order, are what makes a seed's scenes)."""
    n = int(rng.integers(1, max_objects + 1))
    specs: list[tuple[str, str, str, float, float]] = []
    boxes: list[tuple[float, ...]] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n):
        for _try in range(tries):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(colours)[int(rng.integers(len(colours)))]
            sname = "large" if rng.random() < large_share else "small"
            half = sizes[sname][1] * size * canvas / 2
            cx, cy = rng.uniform(half, size - half, size=2)
            box = (cx - half, cy - half, 2 * half, 2 * half)
            if (colour, shape) in used or any(_overlap_share(box, b) > max_overlap for b in boxes):
                continue
            specs.append((shape, colour, sname, float(cx), float(cy)))
            boxes.append(box)
            used.add((colour, shape))
            break
    return specs


# ------------------------------------------------------------------------------------------ texts
def _where(o: SceneObj, size: int) -> str:
    cx, cy = o.centre
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if col:
        return f"on the {col}"
    if row:
        return f"at the {row}"
    return "in the middle"


def _side(o: SceneObj, size: int) -> str:
    cx = o.centre[0]
    return "left" if cx < 0.45 * size else "right" if cx > 0.55 * size else "middle"


def _relation(a: SceneObj, b: SceneObj) -> str:
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def extra_captions(objs: list[SceneObj], size: int) -> list[str]:
    """Two more captions of a scene, drawn without the generator (so asking for them leaves every
    other byte of the data set as it is): the objects from left to right, and the largest one."""
    by_x = sorted(objs, key=lambda o: o.centre[0])
    big = max(objs, key=lambda o: o.box[2] * o.box[3])
    if len(objs) == 1:
        return [f"the only object is a {big.phrase}", f"nothing but the {big.name} {_where(big, size)}"]
    order = ", ".join(f"a {o.phrase}" for o in by_x)
    return [f"from left to right: {order}", f"the largest of {NUMBERS[len(objs)]} objects is the {big.name}"]


def describe(
    objs: list[SceneObj], size: int, rng: np.random.Generator, n_captions: int = 3
) -> tuple[list[str], list[QA], list[Ref]]:
    """Captions (``n_captions``, 3 to 5), VQA pairs (colour, shape, count, existence, position) and
    referring expressions."""
    n = len(objs)
    pick = objs[int(rng.integers(n))]
    if n >= 2:
        i, j = rng.choice(n, size=2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        first = f"a {a.phrase} {_relation(a, b)} a {b.phrase}"
        items = [f"a {o.phrase}" for o in objs]
        listing = f"{NUMBERS[n]} objects: {', '.join(items[:-1])} and {items[-1]}"
    else:
        first = f"a {pick.phrase} {_where(pick, size)}"
        listing = f"a single {pick.phrase} on a textured background"
    captions = [first, listing, f"there is a {pick.phrase} {_where(pick, size)}"]
    captions += extra_captions(objs, size)[: max(0, n_captions - 3)]

    qas = [QA("how many objects are there?", [str(n)], "count")]
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            qas.append(QA(f"what color is the {o.shape}?", [o.colour], "color"))
            break
    for o in objs:
        if colours.count(o.colour) == 1:
            qas.append(QA(f"what shape is the {o.colour} object?", [o.shape], "shape"))
            break
    if rng.random() < 0.5:
        qas.append(QA(f"is there a {pick.name}?", ["yes"], "exists"))
    else:
        present = {(o.colour, o.shape) for o in objs}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        qas.append(QA(f"is there a {c} {s}?", ["no"], "exists"))
    side = _side(pick, size)
    if side != "middle":
        qas.append(QA(f"is the {pick.name} on the left or the right?", [side], "side"))
    if n >= 2:
        a, b = objs[0], objs[1]
        left = a.centre[0] < b.centre[0]
        qas.append(QA(f"is the {a.name} to the left of the {b.name}?", ["yes" if left else "no"], "relation"))

    refs = [
        Ref(
            f"the {o.name} {'in the middle' if _side(o, size) == 'middle' else 'on the ' + _side(o, size)}",
            o.box,
        )
        for o in objs
    ]
    if n >= 2:
        by_x = sorted(objs, key=lambda o: o.centre[0])
        if by_x[1].centre[0] - by_x[0].centre[0] > size / 10:
            refs.append(Ref("the leftmost object", by_x[0].box))
        if by_x[-1].centre[0] - by_x[-2].centre[0] > size / 10:
            refs.append(Ref("the rightmost object", by_x[-1].box))
    return captions, qas, refs


def make_scene(size: int, rng: np.random.Generator, n_captions: int = 3) -> tuple[np.ndarray, Record]:
    """One random scene: (size, size, 3) uint8 image and its record (``image`` left empty)."""
    img, objs = render_scene(sample_specs(size, rng), size, rng)
    return img, scene_record(objs, size, rng, n_captions)


def scene_record(objs: list[Any], size: int, rng: np.random.Generator, n_captions: int = 3) -> Record:
    """The record of a rendered (size, size) scene of ``objs`` (``n_captions`` captions, boxes,
    questions, refs); ``image`` left empty. Both scene styles describe their scenes this way."""
    captions, qas, refs = describe(objs, size, rng, n_captions)
    return Record(
        image="",
        captions=captions,
        objects=[Obj(o.box, o.phrase) for o in objs],
        questions=qas,
        refs=refs,
        width=size,
        height=size,
    )


# ------------------------------------------------------------------------------------------ files
def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n")


def coco_dicts(records: list[Record], split: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(captions, instances) COCO dicts; records' ``image`` paths are the COCO file names."""
    info = {"description": f"COPA synthetic scenes ({split})", "seed": seed}
    images = [{"id": r.image_id, "file_name": r.image, "width": r.width, "height": r.height} for r in records]
    caps = [{"id": 0, "image_id": r.image_id, "caption": c} for r in records for c in r.captions]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    inst = [
        {
            "id": 0,
            "image_id": r.image_id,
            "category_id": cat_id[o.phrase.split()[-1]],
            "bbox": list(o.box),
            "area": o.box[2] * o.box[3],
            "iscrowd": 0,
            "phrase": o.phrase,
        }
        for r in records
        for o in r.objects
    ]
    for k, a in enumerate(caps + inst):
        a["id"] = k + 1
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in cat_id.items()]
    captions = {"info": info, "licenses": [], "images": images, "annotations": caps}
    instances = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": inst,
        "categories": categories,
    }
    return captions, instances


def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="PNG", compress_level=6)


@contextlib.contextmanager
def png_writer(max_pending: int = 64) -> Iterator[Callable[[np.ndarray, Path], None]]:
    """``write(image, path)`` saving (H, W, 3) uint8 images as PNG on one background thread; every
    write has finished, and the first failure is raised, when the block exits. Encoding a 128-px
    scene (~2.5 ms, zlib without the GIL) then overlaps drawing the next (~1.4 ms): 3.9 -> 2.9 ms an
    image, the same files (a second thread adds nothing on 2 cores; BENCHMARKS.md, session 15).
    Drawing outpaces encoding, so a write waits for the oldest once ``max_pending`` images are
    queued: the images held stay bounded however many scenes are drawn."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as pool:
        pending: collections.deque[Future[None]] = collections.deque()

        def write(img: np.ndarray, path: Path) -> None:
            if len(pending) >= max_pending:
                pending.popleft().result()
            pending.append(pool.submit(_save_png, img, path))

        yield write
        while pending:
            pending.popleft().result()


def write_synth(
    out: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    image_size: int = 128,
    box_share: float = 0.05,
    n_captions: int = 3,
) -> dict[str, Any]:
    """Generate and write the synthetic data set (layout in the module docstring). ``n_captions``
    (3 to 5) per image; 4 and 5 add captions without changing anything else.

    Returns a JSON-able summary: counts per split, images with boxes, seconds taken.
    """
    if not 3 <= n_captions <= 5:
        raise ValueError(f"n_captions must be 3, 4 or 5, got {n_captions}")
    t0 = time.perf_counter()
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    seqs = np.random.SeedSequence(seed).spawn(len(SPLITS) + 1)
    summary: dict[str, Any] = {"seed": seed, "image_size": image_size, "box_share": box_share}
    for split, ss in zip(SPLITS, seqs[:-1], strict=True):
        rng = np.random.default_rng(ss)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        with png_writer() as write:
            for i in range(sizes[split]):
                img, rec = make_scene(image_size, rng, n_captions)
                rec.image = f"images/{split}/{i:06d}.png"
                rec.image_id = i
                write(img, out / rec.image)
                records.append(rec)
        if split == "train":
            # the same images with every box, for the ablation that shows what ~5% of boxes costs
            _dump([r.to_dict() for r in records], out / "train_all_boxes.json")
            n_keep = round(box_share * len(records))
            n_keep = max(n_keep, 1) if box_share > 0 and records else n_keep
            keep = set(np.random.default_rng(seqs[-1]).permutation(len(records))[:n_keep].tolist())
            for i, rec in enumerate(records):
                if i not in keep:
                    rec.objects = []
        _dump([r.to_dict() for r in records], out / f"{split}.json")
        caps, inst = coco_dicts(records, split, seed)
        _dump(caps, out / "annotations" / f"captions_{split}.json")
        _dump(inst, out / "annotations" / f"instances_{split}.json")
        summary[split] = {"images": len(records), "with_boxes": sum(bool(r.objects) for r in records)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("synthetic data: %s", summary)
    return summary

"""A bad-input corpus for every reader: good records mixed with each kind of bad input the reader's
format can carry, written into a folder at test time, with the exact counts that reading + the
pre-scan (``read_records`` + ``validate_records(decode=True)``) must report.

Images are tiny (32 px; the "huge" one is 600 px against ``MAX_SIDE`` below), so a corpus is
written in well under a second. ``write_<format>(root)`` returns ``Corpus``: the source path to
read, the counts expected, and the image ids of the records that must come through.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIN_SIDE, MAX_SIDE = 8, 512  # the pre-scan limits the expected counts assume
N_GOOD = 6
BOX = [4, 4, 12, 12]


@dataclass
class Corpus:
    source: Path
    expected: dict[str, int]  # DataReport.summary()["counts"]
    keep: set[Any]  # image ids of the records that must come through
    records_in: int  # entries the reader reads (records + entries it cannot use)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- images
def _png_bytes(size=(32, 32), mode="RGB", seed=0, colour=None) -> bytes:
    if colour is not None:
        im = Image.new(mode, size, colour)
    else:
        arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def gray16_bytes(size=(32, 32)) -> bytes:
    """A 16-bit grayscale PNG of a horizontal ramp (mean value 32767.5 / 257 = 127.5 in 8 bits)."""
    ramp = np.linspace(0, 65535, size[0]).round().astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.tile(ramp, (size[1], 1))).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# name -> bytes (None: the file is missing) and what the pre-scan counts for it
BAD_IMAGES: dict[str, tuple[bytes | None, str]] = {}
REPAIRED_IMAGES: dict[str, tuple[bytes, str]] = {}


def _images() -> None:
    if BAD_IMAGES:
        return
    BAD_IMAGES.update(
        {
            "corrupt": (b"this is not an image at all" * 10, "corrupt_file"),
            "truncated": (_truncated_jpeg(), "truncated_image"),
            "missing": (None, "missing_file"),
            "tiny": (_png_bytes((4, 4)), "tiny_image"),
            "thin": (_png_bytes((600, 9), colour=(10, 20, 30)), "thin_image"),  # 512 x 7.7 after downscaling
        }
    )
    REPAIRED_IMAGES.update(
        {
            "gray16": (gray16_bytes(), "non_rgb_converted"),
            "alpha": (_png_bytes(mode="RGBA", seed=7), "non_rgb_converted"),
            "huge": (_png_bytes((600, 400), colour=(90, 120, 150)), "huge_image"),
        }
    )


def _write_images(folder: Path, ext: str = "png") -> dict[str, str]:
    """Every image of the corpus as ``folder/<name>.<ext>``; name -> file name."""
    _images()
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i in range(N_GOOD):
        (folder / f"good{i}.{ext}").write_bytes(_png_bytes(seed=i + 1))
        names[f"good{i}"] = f"good{i}.{ext}"
    for name, (data, _) in {**BAD_IMAGES, **REPAIRED_IMAGES}.items():
        if data is not None:
            (folder / f"{name}.{ext}").write_bytes(data)
        names[name] = f"{name}.{ext}"
    return names


def _add(counts: dict[str, int], *kinds: str) -> None:
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1


# ------------------------------------------------------------------------------------------- JSON
def write_json(root: Path) -> Corpus:
    """A JSON record list (``Record.to_dict`` form plus ALBEF-style entries)."""
    names = _write_images(root / "images")
    img = {k: f"images/{v}" for k, v in names.items()}
    exp: dict[str, int] = {}

    def good(i: int, **over: Any) -> dict[str, Any]:
        d = {
            "image": img[f"good{i}"],
            "image_id": f"good{i}",
            "captions": [f"good image {i}"],
            "objects": [{"box": BOX, "phrase": "thing"}],
            "questions": [{"q": "what is it?", "answers": ["thing"]}],
            "refs": [{"phrase": "the thing", "box": BOX}],
        }
        d.update(over)
        return d

    entries: list[Any] = [good(i) for i in range(N_GOOD)]
    keep = {f"good{i}" for i in range(N_GOOD)}
    for name, (_, kind) in BAD_IMAGES.items():
        entries.append({"image": img[name], "image_id": name, "caption": "fine"})
        _add(exp, kind)
    for name, (_, kind) in REPAIRED_IMAGES.items():
        entries.append({"image": img[name], "image_id": name, "caption": "fine"})
        keep.add(name)
        _add(exp, kind)
    # one bad field each: the field goes, the record stays (good{i} images are shared on purpose:
    # the pre-scan does not mind; the image is not what is tested here)
    fields = {
        "string_box": {"objects": [{"box": "oops", "phrase": "x"}, {"box": BOX, "phrase": "kept"}]},
        "three_box": {"objects": [{"box": [1, 2, 3], "phrase": "x"}]},
        "null_box": {"refs": [{"box": None, "phrase": "x"}]},
        "objects_oops": {"objects": "oops"},
        "answers_null": {"questions": [{"q": "why?", "answers": None}]},
        "null_caption": {"captions": [None, "a caption survives"]},
        "width_text": {"width": "abc"},
        "questions_dict": {"questions": {"q": "not a list"}},
    }
    for name, over in fields.items():
        entries.append(good(0, image_id=name, **over))
        keep.add(name)
        _add(exp, "malformed_field")
    # text and box repairs
    texts = {
        "empty_caption": ({"captions": ["", "still one"]}, ["empty_caption"]),
        "space_only": (
            {"captions": ["  \t "], "objects": [], "questions": [], "refs": []},
            ["empty_caption", "no_text"],
        ),
        "long": ({"captions": ["word " * 400]}, ["long_caption"]),
        "unicode": ({"captions": ["ein Bär läuft über die Straße"]}, ["non_ascii"]),
        "outside": ({"objects": [{"box": [20, 20, 40, 40], "phrase": "big"}]}, ["box_outside"]),
        "zero_area": ({"objects": [{"box": [5, 5, 0, 10], "phrase": "flat"}]}, ["zero_area_box"]),
        "negative": ({"objects": [{"box": [-5, -5, 10, 10], "phrase": "corner"}]}, ["negative_coords"]),
        "no_answer": ({"questions": [{"q": "what?", "answers": []}]}, ["no_answer"]),
        "empty_phrase": ({"objects": [{"box": BOX, "phrase": " "}]}, ["empty_phrase"]),
    }
    for name, (over, kinds) in texts.items():
        entries.append(good(1, image_id=name, **over))
        if "no_text" not in kinds:
            keep.add(name)
        _add(exp, *kinds)
    # entries that are no record at all
    entries += ["just a string", {"caption": "no image"}, {"image": None, "caption": "null image"}, 42]
    _add(exp, *["malformed_record"] * 4)
    path = root / "records.json"
    path.write_text(json.dumps(entries))
    return Corpus(path, exp, keep, len(entries))


# ------------------------------------------------------------------------------------------- COCO
def write_coco(root: Path) -> Corpus:
    """``annotations/captions_x.json`` + ``instances_x.json``; images under ``root/images``."""
    names = _write_images(root / "images")
    exp: dict[str, int] = {}
    images: list[Any] = []
    caps: list[Any] = []
    inst: list[Any] = []
    keep: set[Any] = set()

    def image(iid: int, name: str) -> None:
        images.append({"id": iid, "file_name": f"images/{names[name]}", "width": 32, "height": 32})

    def caption(iid: Any, text: Any = "a fine caption") -> None:
        caps.append({"id": len(caps) + 1, "image_id": iid, "caption": text})

    def box(iid: Any, bbox: Any, **more: Any) -> None:
        a = {"id": len(inst) + 1, "image_id": iid, "category_id": 1, "bbox": bbox, "iscrowd": 0}
        inst.append({**a, **more})

    for i in range(N_GOOD):
        image(i + 1, f"good{i}")
        caption(i + 1, f"good image {i}")
        box(i + 1, BOX)
        keep.add(i + 1)
    iid = 100
    for name, (_, kind) in BAD_IMAGES.items():
        image(iid, name)
        caption(iid)
        _add(exp, kind)
        iid += 1
    for name, (_, kind) in REPAIRED_IMAGES.items():
        image(iid, name)
        caption(iid)
        keep.add(iid)
        _add(exp, kind)
        iid += 1
    # annotations of good images that are malformed: left out, counted; the image stays
    caption(1, None)  # null caption: not the text "None"
    caps.append({"id": 900, "image_id": 2})  # no caption
    caps.append({"id": 901, "caption": "whose?"})  # no image_id
    caption(999, "of an image the file does not list")
    _add(exp, "malformed_field", "malformed_field", "malformed_field", "orphan_annotation")
    box(1, "10 10 5 5")  # string bbox
    box(2, [1, 2, 3])  # short bbox
    inst.append({"id": 950, "image_id": 3, "category_id": 1, "iscrowd": 0})  # no bbox
    box(999, BOX)
    _add(exp, "malformed_field", "malformed_field", "malformed_field", "orphan_annotation")
    box(3, [0, 0, 5, 5], iscrowd=1)  # a crowd region: left out by design, not bad input
    box(4, [20, 20, 40, 40])
    box(5, [-5, -5, 10, 10])
    box(6, [5, 5, 0, 10])
    _add(exp, "box_outside", "negative_coords", "zero_area_box")
    caption(2, "")
    caption(3, "über")
    _add(exp, "empty_caption", "non_ascii")
    # image entries that are no record
    images += [{"id": 500}, {"id": 501, "file_name": None}, "not an image entry"]
    _add(exp, "malformed_record", "malformed_record", "malformed_record")
    image(600, "good0")  # listed, but nothing is said about it
    _add(exp, "no_text")
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    cats = [{"id": 1, "name": "thing"}]
    (ann / "captions_x.json").write_text(json.dumps({"images": images, "annotations": caps}))
    instances = {"images": images, "annotations": inst, "categories": cats}
    (ann / "instances_x.json").write_text(json.dumps(instances))
    return Corpus(ann / "captions_x.json", exp, keep, len(images))


# ----------------------------------------------------------------------------------- Visual Genome
def write_vg(root: Path) -> Corpus:
    """``region_descriptions.json``; images are ``<id>.jpg`` (PNG bytes: the decoder reads the content)."""
    names = _write_images(root / "tmp")
    exp: dict[str, int] = {}
    ids: dict[str, int] = {}
    for k, name in enumerate(names):
        ids[name] = k + 1
        src = root / "tmp" / names[name]
        if src.exists():
            src.rename(root / f"{k + 1}.jpg")
    (root / "tmp").rmdir()

    def region(x: Any = 4, y: Any = 4, w: Any = 12, h: Any = 12, phrase: Any = "a thing") -> dict[str, Any]:
        return {"x": x, "y": y, "width": w, "height": h, "phrase": phrase}

    entries: list[Any] = []
    keep: set[Any] = set()
    for name, iid in ids.items():
        entries.append({"id": iid, "regions": [region(phrase=f"{name} region")]})
        kind = BAD_IMAGES.get(name, REPAIRED_IMAGES.get(name, (None, None)))[1]
        if kind:
            _add(exp, kind)
        if name not in BAD_IMAGES:
            keep.add(iid)
    good = ids["good0"]
    bad_regions = [
        {"y": 1, "width": 2, "height": 2, "phrase": "no x"},
        region(w="abc"),
        region(phrase=None),
        "not a region",
    ]
    entries.append({"id": good, "regions": [region(), *bad_regions]})
    _add(exp, *["malformed_field"] * 4)
    entries.append({"id": ids["good1"], "regions": "oops"})  # no regions left: no text
    _add(exp, "malformed_field", "no_text")
    entries.append(
        {
            "id": ids["good2"],
            "regions": [
                region(20, 20, 40, 40),
                region(5, 5, 0, 9, "flat"),
                region(-4, 0, 8, 8, "edge"),
                region(phrase=" "),
            ],
        }
    )
    _add(exp, "box_outside", "zero_area_box", "negative_coords", "empty_phrase")
    entries += ["not an entry", {"regions": []}]
    _add(exp, "malformed_record", "malformed_record")
    path = root / "region_descriptions.json"
    path.write_text(json.dumps(entries))
    # records that share an image id are distinct records: the kept ids are counted per record
    n_keep = len(keep) + 2  # + the entries of good0 (bad regions) and good2 (repaired boxes) again
    return Corpus(path, exp, keep, len(entries), extra={"records_out": n_keep})


# ------------------------------------------------------------------------------------- webdataset
def _tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """Write a tar; returns each member's header offset."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]


def write_wds(root: Path) -> Corpus:
    """Shards: one of good + repaired samples, one of bad samples, one truncated after its first
    sample (the rest is lost: counted as one truncated shard) and one that is no tar at all."""
    _images()
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, int] = {}
    keep: set[Any] = set()

    def meta(iid: str, **over: Any) -> bytes:
        d = {"image_id": iid, "captions": [f"caption of {iid}"], "objects": [{"box": BOX, "phrase": "thing"}]}
        d.update(over)
        return json.dumps(d).encode()

    good = []
    for i in range(N_GOOD):
        good += [(f"{i:04d}.json", meta(f"good{i}")), (f"{i:04d}.png", _png_bytes(seed=i + 1))]
        keep.add(f"good{i}")
    for k, (name, (data, kind)) in enumerate(REPAIRED_IMAGES.items()):
        good += [(f"r{k:03d}.json", meta(name)), (f"r{k:03d}.png", data)]
        keep.add(name)
        _add(exp, kind)
    _tar(root / "shard-000000.tar", good)
    n_in = N_GOOD + len(REPAIRED_IMAGES)

    bad: list[tuple[str, bytes]] = []
    for k, (name, (data, kind)) in enumerate(BAD_IMAGES.items()):
        bad.append((f"b{k:03d}.json", meta(name)))
        if data is not None:
            bad.append((f"b{k:03d}.{'jpg' if name == 'truncated' else 'png'}", data))
        _add(exp, kind)  # "missing": a sample without an image member counts as missing_file
        n_in += 1
    bad += [("m000.json", b"{not json"), ("m000.png", _png_bytes(seed=1))]  # broken .json
    bad += [("m001.png", _png_bytes(seed=2))]  # no .json at all
    bad += [("m002.json", b"[1, 2]"), ("m002.png", _png_bytes(seed=3))]  # .json not an object
    _add(exp, "malformed_record", "malformed_record", "malformed_record")
    bad += [
        ("f000.json", meta("field", objects=[{"box": [1, 2, 3], "phrase": "x"}])),
        ("f000.png", _png_bytes(seed=4)),
    ]
    keep.add("field")
    _add(exp, "malformed_field")
    bad += [("t000.json", meta("blank", captions=["   "], objects=[])), ("t000.png", _png_bytes(seed=5))]
    _add(exp, "empty_caption", "no_text")
    n_in += 5
    _tar(root / "shard-000001.tar", bad)

    # cut at the header of the second sample: the first comes through, the rest is lost unseen
    cut = [
        ("c000.json", meta("before_cut")),
        ("c000.png", _png_bytes(seed=6)),
        ("c001.json", meta("after_cut")),
        ("c001.png", _png_bytes(seed=7)),
    ]
    offsets = _tar(root / "shard-000002.tar", cut)
    data = (root / "shard-000002.tar").read_bytes()
    (root / "shard-000002.tar").write_bytes(data[: offsets[2]])
    keep.add("before_cut")
    n_in += 1
    _add(exp, "truncated_shard")
    (root / "shard-000003.tar").write_bytes(b"not a tar file " * 100)
    _add(exp, "unreadable_shard")
    return Corpus(root, exp, keep, n_in)


WRITERS = {"json": write_json, "coco": write_coco, "vg": write_vg, "wds": write_wds}

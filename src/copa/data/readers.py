"""Readers: JSON record lists, COCO, Visual Genome and webdataset shards, all yielding ``Record``.

Image paths are resolved against ``image_root``; when it is empty the default is the annotation
file's directory (for COCO files inside an ``annotations/`` folder: that folder's parent, the usual
dataset root). Absolute paths are kept.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from copa.data.records import Obj, Record

log = logging.getLogger(__name__)

FORMATS = ("json", "coco", "vg", "wds")


def _resolve(root: str | Path, image: str) -> str:
    if not root or Path(image).is_absolute():
        return image
    return str(Path(root) / image)


def _default_root(path: Path, image_root: str) -> str:
    if image_root:
        return image_root
    return str(path.parent.parent if path.parent.name == "annotations" else path.parent)


def _load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------- JSON list
def parse_json_list(data: list[dict[str, Any]], image_root: str) -> list[Record]:
    """Record dicts, or ALBEF/mPLUG ``{"image", "caption"}`` / ``{"image", "question", "answer"}``."""
    out = []
    bad = 0
    for i, d in enumerate(data):
        try:
            rec = Record.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError):
            bad += 1  # an entry without an image or with a malformed box: not a usable record
            continue
        rec.image = _resolve(image_root, rec.image)
        if rec.image_id == "":
            rec.image_id = i
        out.append(rec)
    if bad:
        log.warning("skipped %d malformed entries (no image, or a box that is not 4 numbers)", bad)
    return out


def read_json(path: str | Path, image_root: str = "") -> list[Record]:
    """A JSON list of records (``Record.to_dict`` form or the plain ALBEF/mPLUG list)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise TypeError(f"{path}: expected a JSON list of records")
    return parse_json_list(data, _default_root(path, image_root))


# --------------------------------------------------------------------------------------------- COCO
def parse_coco(
    captions: dict[str, Any] | None, instances: dict[str, Any] | None, image_root: str
) -> list[Record]:
    """COCO ``captions_*`` + ``instances_*`` dicts → records, in the order of the ``images`` list.

    The phrase of a box is the annotation's ``phrase`` (a COPA extension the synthetic set writes)
    or else its category name. Crowd annotations (``iscrowd=1``) are regions, not objects: skipped.
    """
    base = captions if captions is not None else instances
    if base is None:
        raise ValueError("COCO reader needs a captions or an instances file")
    caps: dict[Any, list[str]] = defaultdict(list)
    for a in (captions or {}).get("annotations", []):
        caps[a["image_id"]].append(a["caption"])
    objs: dict[Any, list[Obj]] = defaultdict(list)
    if instances is not None:
        names = {c["id"]: c["name"] for c in instances.get("categories", [])}
        for a in instances.get("annotations", []):
            if a.get("iscrowd", 0):
                continue
            phrase = a.get("phrase") or names.get(a.get("category_id"), "")
            objs[a["image_id"]].append(Obj(tuple(float(v) for v in a["bbox"]), phrase))  # type: ignore[arg-type]
    out = []
    for im in base.get("images", []):
        iid = im["id"]
        out.append(
            Record(
                image=_resolve(image_root, im["file_name"]),
                captions=caps.get(iid, []),
                objects=objs.get(iid, []),
                image_id=iid,
                width=im.get("width"),
                height=im.get("height"),
            )
        )
    return out


def _coco_pair(path: Path) -> tuple[Path | None, Path | None]:
    if path.is_dir():
        ann = path / "annotations" if (path / "annotations").is_dir() else path
        found = sorted(ann.glob("captions_*.json"))
        if len(found) != 1:
            raise ValueError(
                f"{path}: expected exactly one annotations/captions_*.json, found "
                f"{[p.name for p in found]}; pass the captions file itself"
            )
        path = found[0]
    if path.name.startswith("instances_"):
        other = path.with_name("captions_" + path.name[len("instances_") :])
        return (other if other.exists() else None), path
    other = path.with_name(path.name.replace("captions_", "instances_", 1))
    return path, (other if other != path and other.exists() else None)


def read_coco(path: str | Path, image_root: str = "") -> list[Record]:
    """COCO captions (and the matching ``instances_*`` file beside it, if present).

    ``path`` is ``captions_X.json``, ``instances_X.json`` or a dataset directory holding exactly one
    ``annotations/captions_*.json``.
    """
    cap_path, inst_path = _coco_pair(Path(path))
    ref = cap_path or inst_path
    assert ref is not None
    caps = _load_json(cap_path) if cap_path else None
    inst = _load_json(inst_path) if inst_path else None
    return parse_coco(caps, inst, _default_root(ref, image_root))


# ------------------------------------------------------------------------------------ Visual Genome
def parse_vg(data: list[dict[str, Any]], image_root: str) -> list[Record]:
    """VG ``region_descriptions.json``: each region becomes an object (box + phrase); the distinct
    region phrases are the image's captions (as ALBEF/mPLUG use VG for pre-training). The image is
    ``{image_id}.jpg`` under ``image_root`` (VG ships VG_100K and VG_100K_2; point the root at a
    folder holding both, e.g. via symlinks)."""
    out = []
    for entry in data:
        regions = entry.get("regions", [])
        iid = entry.get("id", entry.get("image_id", regions[0]["image_id"] if regions else ""))
        objects = [
            Obj(
                (float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"])),
                str(r.get("phrase", "")),
            )
            for r in regions
        ]
        captions = list(dict.fromkeys(o.phrase.strip() for o in objects if o.phrase.strip()))
        out.append(
            Record(image=_resolve(image_root, f"{iid}.jpg"), captions=captions, objects=objects, image_id=iid)
        )
    return out


def read_vg(path: str | Path, image_root: str = "") -> list[Record]:
    path = Path(path)
    return parse_vg(_load_json(path), _default_root(path, image_root))


# ------------------------------------------------------------------------------------------- auto
def detect_format(path: str | Path, data: Any = None) -> str:
    """Guess the format from the path (and the loaded JSON, when given)."""
    s = str(path)
    p = Path(s)
    if s.endswith(".tar") or ("{" in s and ".." in s) or (p.is_dir() and any(p.glob("*.tar"))):
        return "wds"
    if p.is_dir():
        return "coco"
    if isinstance(data, dict) and "images" in data:
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        return "vg"
    if isinstance(data, list):
        return "json"
    raise ValueError(f"cannot tell the format of {s}; set data.format to one of {FORMATS}")


def read_records(path: str | Path, format: str = "auto", image_root: str = "") -> list[Record]:
    """Read any supported source into a list of records (``format="auto"`` detects it).

    For webdataset shards this materialises every sample (images included); stream large shard
    sets with ``copa.data.shards.ShardDataset`` instead.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"unknown data format {format!r}; expected auto or one of {FORMATS}")
    p = Path(str(path))
    data = _load_json(p) if p.is_file() and p.suffix == ".json" else None
    if format == "auto":
        format = detect_format(path, data)
    log.debug("reading %s as %s", path, format)
    if format == "wds":
        from copa.data.shards import iter_shards

        return list(iter_shards(str(path)))
    if format == "coco":
        if data is None:
            return read_coco(p, image_root)
        cap_path, inst_path = _coco_pair(p)
        caps = data if p == cap_path else (_load_json(cap_path) if cap_path else None)
        inst = data if p == inst_path else (_load_json(inst_path) if inst_path else None)
        return parse_coco(caps, inst, _default_root(p, image_root))
    if data is None:
        data = _load_json(p)
    root = _default_root(p, image_root)
    return parse_vg(data, root) if format == "vg" else parse_json_list(data, root)

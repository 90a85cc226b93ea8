"""Readers: JSON record lists, COCO, Visual Genome and webdataset shards, all yielding ``Record``.

Image paths are resolved against ``image_root``; when it is empty the default is the annotation
file's directory (for COCO files inside an ``annotations/`` folder: that folder's parent, the usual
dataset root). Absolute paths are kept.

A reader never drops input silently and never gives up on a whole file for one bad entry: an entry
that cannot become a record is skipped (``malformed_record``), a malformed field or annotation is
left out of its record (``malformed_field``; an annotation of an image the file does not list:
``orphan_annotation``), and every reader returns a ``RecordList`` whose ``report`` counts them.
A source that cannot be read at all (missing, not JSON, the wrong layout, no records) raises
``DataSourceError`` with a one-line message.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from copa.data.badinput import DataReport
from copa.data.records import MALFORMED_FIELD, Obj, Record, RecordList, parse_box, parse_text
from copa.errors import DataFileNotFoundError, DataSourceError

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
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataSourceError(f"{path} is a directory, not a JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path} is not a JSON text file ({e.reason})") from None
    except json.JSONDecodeError as e:
        if not path.stat().st_size:
            empty = f"{path} is empty; expected a JSON list of records or a COCO file"
            raise DataSourceError(empty) from None
        where = f"line {e.lineno}, column {e.colno}"
        raise DataSourceError(f"{path} is not valid JSON: {e.msg} at {where}") from None


def _finish(out: list[Record], entries: int, drops: Counter[str], what: str) -> RecordList:
    """The reader's result with its report; logs what was left out."""
    recs = RecordList(out)
    recs.report = DataReport(
        counts=Counter({k: n for k, n in drops.items() if n}), records_in=entries, records_out=len(out)
    )
    if drops:
        log.warning("%s: %d records from %d entries; left out: %s", what, len(out), entries, dict(drops))
    return recs


# ---------------------------------------------------------------------------------------- JSON list
def parse_json_list(data: list[Any], image_root: str) -> RecordList:
    """Record dicts, or ALBEF/mPLUG ``{"image", "caption"}`` / ``{"image", "question", "answer"}``."""
    out = []
    drops: Counter[str] = Counter()
    for i, d in enumerate(data):
        try:
            rec = Record.from_dict(d, drops)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.debug("entry %d skipped: %s", i, e)
            drops["malformed_record"] += 1  # not an object, or no image path
            continue
        rec.image = _resolve(image_root, rec.image)
        if rec.image_id == "":
            rec.image_id = i
        out.append(rec)
    return _finish(out, len(data), drops, "JSON records")


def read_json(path: str | Path, image_root: str = "") -> RecordList:
    """A JSON list of records (``Record.to_dict`` form or the plain ALBEF/mPLUG list)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return parse_json_list(data, _default_root(path, image_root))


# --------------------------------------------------------------------------------------------- COCO
def _coco_list(d: dict[str, Any], key: str, name: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise DataSourceError(f"COCO {name} file: '{key}' must be a list, got {type(value).__name__}")
    return value


def _hashable(v: Any) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def parse_coco(
    captions: dict[str, Any] | None, instances: dict[str, Any] | None, image_root: str
) -> RecordList:
    """COCO ``captions_*`` + ``instances_*`` dicts → records, in the order of the ``images`` list.

    The phrase of a box is the annotation's ``phrase`` (a COPA extension the synthetic set writes)
    or else its category name. Crowd annotations (``iscrowd=1``) are regions, not objects: left out
    by design (not counted). An annotation with a missing or malformed ``caption`` / ``bbox`` /
    ``image_id`` is left out and counted; so is an image entry without ``id`` or ``file_name``.
    """
    base = captions if captions is not None else instances
    if base is None:
        raise DataSourceError("COCO reader needs a captions or an instances file")
    for d, name in ((captions, "captions"), (instances, "instances")):
        if d is not None and not isinstance(d, dict):
            raise DataSourceError(f"COCO {name} file: expected a JSON object, got {type(d).__name__}")
    drops: Counter[str] = Counter()
    images = _coco_list(base, "images", "captions" if base is captions else "instances")
    known = {im["id"] for im in images if isinstance(im, dict) and _hashable(im.get("id"))}

    def owner(a: Any) -> Any:
        """The annotation's image id, or None (counted) when it has none or names no listed image."""
        if not isinstance(a, dict) or not _hashable(a.get("image_id")):
            drops[MALFORMED_FIELD] += 1
            return None
        if a["image_id"] not in known:
            drops["orphan_annotation"] += 1
            return None
        return a["image_id"]

    caps: dict[Any, list[str]] = defaultdict(list)
    for a in _coco_list(captions or {}, "annotations", "captions"):
        iid = owner(a)
        if iid is None:
            continue
        if not isinstance(a.get("caption"), str):  # missing or null: not the text "None"
            drops[MALFORMED_FIELD] += 1
            continue
        caps[iid].append(a["caption"])
    objs: dict[Any, list[Obj]] = defaultdict(list)
    if instances is not None:
        cats = _coco_list(instances, "categories", "instances")
        names = {c["id"]: c.get("name", "") for c in cats if isinstance(c, dict) and _hashable(c.get("id"))}
        for a in _coco_list(instances, "annotations", "instances"):
            if isinstance(a, dict) and a.get("iscrowd", 0):
                continue
            iid = owner(a)
            if iid is None:
                continue
            try:
                phrase = a.get("phrase") or names.get(a.get("category_id"), "") or ""
                objs[iid].append(Obj(parse_box(a.get("bbox")), parse_text(phrase, "phrase")))
            except (ValueError, TypeError) as e:
                log.debug("COCO annotation %s left out: %s", a.get("id"), e)
                drops[MALFORMED_FIELD] += 1
    out = []
    for im in images:
        if not (isinstance(im, dict) and _hashable(im.get("id")) and isinstance(im.get("file_name"), str)):
            drops["malformed_record"] += 1
            continue
        iid = im["id"]
        width, height = im.get("width"), im.get("height")
        out.append(
            Record(
                image=_resolve(image_root, im["file_name"]),
                captions=caps.get(iid, []),
                objects=objs.get(iid, []),
                image_id=iid,
                width=width if isinstance(width, int) and width > 0 else None,
                height=height if isinstance(height, int) and height > 0 else None,
            )
        )
    return _finish(out, len(images), drops, "COCO")


def _coco_pair(path: Path) -> tuple[Path | None, Path | None]:
    if path.is_dir():
        ann = path / "annotations" if (path / "annotations").is_dir() else path
        found = sorted(ann.glob("captions_*.json"))
        if len(found) != 1:
            raise DataSourceError(
                f"{path}: expected exactly one annotations/captions_*.json, found "
                f"{[p.name for p in found]}; pass the captions file itself"
            )
        path = found[0]
    if path.name.startswith("instances_"):
        other = path.with_name("captions_" + path.name[len("instances_") :])
        return (other if other.exists() else None), path
    other = path.with_name(path.name.replace("captions_", "instances_", 1))
    return path, (other if other != path and other.exists() else None)


def read_coco(path: str | Path, image_root: str = "") -> RecordList:
    """COCO captions (and the matching ``instances_*`` file beside it, if present).

    ``path`` is ``captions_X.json``, ``instances_X.json`` or a dataset directory holding exactly one
    ``annotations/captions_*.json``.
    """
    if not Path(path).exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    cap_path, inst_path = _coco_pair(Path(path))
    ref = cap_path or inst_path
    assert ref is not None
    caps = _load_json(cap_path) if cap_path else None
    inst = _load_json(inst_path) if inst_path else None
    return parse_coco(caps, inst, _default_root(ref, image_root))


# ------------------------------------------------------------------------------------ Visual Genome
def _region(r: Any) -> Obj:
    if not isinstance(r, dict):
        raise TypeError(f"a region is a JSON object, got {r!r}")
    box = parse_box([r.get("x"), r.get("y"), r.get("width"), r.get("height")])
    return Obj(box, parse_text(r.get("phrase", ""), "phrase"))


def parse_vg(data: list[Any], image_root: str) -> RecordList:
    """VG ``region_descriptions.json``: each region becomes an object (box + phrase); the distinct
    region phrases are the image's captions (as ALBEF/mPLUG use VG for pre-training). The image is
    ``{image_id}.jpg`` under ``image_root`` (VG ships VG_100K and VG_100K_2; point the root at a
    folder holding both, e.g. via symlinks). A malformed region is left out of its image and
    counted; an entry with no usable image id is skipped and counted."""
    out = []
    drops: Counter[str] = Counter()
    for entry in data:
        if not isinstance(entry, dict):
            drops["malformed_record"] += 1
            continue
        regions = entry.get("regions", [])
        if not isinstance(regions, list):
            drops[MALFORMED_FIELD] += 1
            regions = []
        first = regions[0] if regions and isinstance(regions[0], dict) else {}
        iid = entry.get("id", entry.get("image_id", first.get("image_id")))
        if not _hashable(iid) or iid == "":
            drops["malformed_record"] += 1
            continue
        objects = []
        for r in regions:
            try:
                objects.append(_region(r))
            except (ValueError, TypeError) as e:
                log.debug("VG image %s: region left out: %s", iid, e)
                drops[MALFORMED_FIELD] += 1
        captions = list(dict.fromkeys(o.phrase.strip() for o in objects if o.phrase.strip()))
        out.append(
            Record(image=_resolve(image_root, f"{iid}.jpg"), captions=captions, objects=objects, image_id=iid)
        )
    return _finish(out, len(data), drops, "Visual Genome")


def read_vg(path: str | Path, image_root: str = "") -> RecordList:
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataSourceError(
            f"{path}: expected a Visual Genome list of images, got a JSON {type(data).__name__}"
        )
    return parse_vg(data, _default_root(path, image_root))


# ------------------------------------------------------------------------------------------- auto
def looks_like_shards(path: str | Path) -> bool:
    """A ``.tar`` file, a brace pattern ``a-{000..009}.tar`` or a directory holding ``*.tar``."""
    s = str(path)
    p = Path(s)
    return s.endswith(".tar") or ("{" in s and ".." in s) or (p.is_dir() and any(p.glob("*.tar")))


def detect_format(path: str | Path, data: Any = None) -> str:
    """Guess the format from the path (and the loaded JSON, when given)."""
    s = str(path)
    p = Path(s)
    if looks_like_shards(s):
        return "wds"
    if not p.exists():
        raise DataFileNotFoundError(f"data file not found: {s}")
    if p.is_dir():
        return "coco"
    if isinstance(data, dict) and "images" in data:
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        return "vg"
    if isinstance(data, list):
        return "json"
    if isinstance(data, dict):
        raise DataSourceError(
            f"{s}: a JSON object without COCO's 'images'; expected a JSON list of records, a COCO file or "
            f"Visual Genome's region list"
        )
    if data is not None:
        raise DataSourceError(
            f"{s}: a JSON {type(data).__name__}; expected a JSON list of records or a COCO file"
        )
    raise DataSourceError(f"cannot tell the format of {s}; set data.format to one of {FORMATS}")


def read_records(path: str | Path, format: str = "auto", image_root: str = "") -> RecordList:
    """Read any supported source into a list of records (``format="auto"`` detects it).

    For webdataset shards this materialises every sample (images included); stream large shard
    sets with ``copa.data.shards.ShardDataset`` instead. The result's ``report`` counts what the
    reader left out; a source without a single record raises ``DataSourceError``.
    """
    if format not in ("auto", *FORMATS):
        raise DataSourceError(f"unknown data format {format!r}; expected auto or one of {FORMATS}")
    recs = _read(path, format, image_root)
    if not recs:
        lost = recs.report.events() if recs.report is not None else {}
        detail = f" (left out: {lost})" if lost.get("records_in") else ""
        raise DataSourceError(f"{path}: no records{detail}")
    return recs


def _read(path: str | Path, format: str, image_root: str) -> RecordList:
    p = Path(str(path))
    if format == "wds" or (format == "auto" and looks_like_shards(path)):
        from copa.data.shards import iter_shards

        report = DataReport()
        recs = RecordList(iter_shards(str(path), report))
        report.records_out = len(recs)
        recs.report = report
        return recs
    data = _load_json(p) if p.is_file() and p.suffix == ".json" else None
    if format == "auto":
        format = detect_format(path, data)
    log.debug("reading %s as %s", path, format)
    if format == "coco":
        if data is None:
            return read_coco(p, image_root)
        cap_path, inst_path = _coco_pair(p)
        caps = data if p == cap_path else (_load_json(cap_path) if cap_path else None)
        inst = data if p == inst_path else (_load_json(inst_path) if inst_path else None)
        return parse_coco(caps, inst, _default_root(p, image_root))
    if data is None:
        data = _load_json(p)
    if not isinstance(data, list):
        raise DataSourceError(f"{p}: expected a JSON list, got a JSON {type(data).__name__}")
    root = _default_root(p, image_root)
    return parse_vg(data, root) if format == "vg" else parse_json_list(data, root)

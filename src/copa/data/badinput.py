"""Bad input: validate records, repair what can be repaired, count everything (``DataReport``).

Images are opened and checked by ``copa.data.image_io``; the limits (image sides, caption length)
come from ``DataConfig`` only. This module holds the policy: what is skipped, repaired or dropped,
and the counts.

Policy (SPEC §3: nothing is lost silently, nothing stops the run):

* ``validate_records`` runs once in the main process before training. It cleans texts and boxes
  and opens every image *header* (cheap: no pixel decode) to catch missing, corrupt, tiny, huge and
  non-RGB images. Records that cannot be used are dropped here, so a DataLoader never sees them,
  and every count lives in one ``DataReport`` in the main process.
* A header can look fine while the pixel data is broken (a truncated JPEG). ``decode=True`` finds
  those in the pre-scan too (full decode; fine for small sets such as the synthetic one). Otherwise
  the dataset finds them when loading, and substitutes the next good sample; that substitution is
  reported as events that travel with the batch (``Batch.events``) so the main process can merge
  them (``DataReport.update``) — counted, never silent.

* Readers count what they cannot turn into a record (``malformed_record``) or must leave out of one
  (``malformed_field``, ``orphan_annotation``, unreadable shards) and return the counts with the
  records (``RecordList.report``); ``validate_records`` folds them into the pre-scan's report, so
  one report covers the source and reaches the run summary with the pre-scan's counts.

Kinds: ``SKIP`` lose the record, ``REPAIR`` fix it, ``DROP`` remove one caption/box/question/field
of it, ``INFO`` changes nothing, ``SHARD`` counts shard files (a truncated tar loses an unknown
number of records after the cut; an unreadable one all of its records).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from copa.config import DataConfig
from copa.data.image_io import ImageError, check_image
from copa.data.records import QA, Box, Obj, Record, Ref

log = logging.getLogger(__name__)

SKIP = (
    "missing_file",
    "corrupt_file",
    "truncated_image",
    "tiny_image",
    "thin_image",
    "decompression_bomb",
    "no_text",
    "malformed_record",
)
REPAIR = ("non_rgb_converted", "huge_image", "long_caption", "box_outside", "negative_coords")
DROP = ("empty_caption", "empty_phrase", "zero_area_box", "no_answer", "malformed_field", "orphan_annotation")
INFO = ("non_ascii", "substituted")
SHARD = ("truncated_shard", "unreadable_shard")
KINDS = SKIP + REPAIR + DROP + INFO + SHARD
RECORD_KEYS = ("records_in", "records_out")  # also travel in event dicts (streams count records as they go)


@dataclass
class DataReport:
    """Counts of bad-input events by kind, plus records in/out. Mergeable (``merge``/``update``)."""

    counts: Counter[str] = field(default_factory=Counter)
    records_in: int = 0
    records_out: int = 0

    def add(self, kind: str, n: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown data-report kind {kind!r}")
        self.counts[kind] += n

    def update(self, events: Mapping[str, int]) -> None:
        """Add event counts, e.g. ``Batch.events`` produced in DataLoader workers (``records_in`` /
        ``records_out`` keys add to those totals)."""
        for k, n in events.items():
            if k == "records_in":
                self.records_in += int(n)
            elif k == "records_out":
                self.records_out += int(n)
            else:
                self.add(k, n)

    def events(self) -> dict[str, int]:
        """The counts as an event dict (``update`` of another report adds them back)."""
        out = {k: n for k, n in self.counts.items() if n}
        out.update({k: getattr(self, k) for k in RECORD_KEYS if getattr(self, k)})
        return out

    def take(self) -> dict[str, int]:
        """``events()``, then reset to zero (a stream hands its counts on with each sample)."""
        out = self.events()
        self.counts.clear()
        self.records_in = self.records_out = 0
        return out

    def merge(self, other: DataReport) -> DataReport:
        self.update(other.counts)
        self.records_in += other.records_in
        self.records_out += other.records_out
        return self

    def summary(self) -> dict[str, Any]:
        """JSON-able summary for the run summary: totals per class and counts per kind."""
        c = self.counts
        return {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "skipped": sum(c[k] for k in SKIP),
            "repaired": sum(c[k] for k in REPAIR),
            "dropped_items": sum(c[k] for k in DROP),
            "counts": {k: c[k] for k in KINDS if c[k]},
        }


def clean_text(text: str, report: DataReport, empty_kind: str, max_chars: int) -> str | None:
    """Strip; ``None`` (and count ``empty_kind``) if nothing is left; truncate overlong text."""
    t = " ".join(str(text).split())
    if not t:
        report.add(empty_kind)
        return None
    if len(t) > max_chars:
        report.add("long_caption")
        cut = t[:max_chars]
        t = cut.rsplit(" ", 1)[0] if " " in cut else cut
    if not t.isascii():
        report.add("non_ascii")
    return t


def clean_box(box: Box, width: int | None, height: int | None) -> tuple[Box | None, str | None]:
    """Clip a box to the image. Returns (box or None if dropped, kind counted or None).

    Zero/negative size or non-finite values → dropped (``zero_area_box``); negative coordinates →
    clipped (``negative_coords``); beyond the right/bottom edge by more than a pixel (COCO has
    sub-pixel overshoots that are clipped silently) → clipped (``box_outside``); nothing left after
    clipping → dropped.
    """
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box) or w <= 0 or h <= 0:
        return None, "zero_area_box"
    x1, y1 = x + w, y + h
    kind = None
    if x < 0 or y < 0:
        kind = "negative_coords"
    elif width is not None and height is not None and (x1 > width + 1 or y1 > height + 1):
        kind = "box_outside"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    if width is not None and height is not None:
        x1, y1 = min(x1, float(width)), min(y1, float(height))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, kind or "box_outside"
    return (x0, y0, x1 - x0, y1 - y0), kind


def validate_record(
    rec: Record,
    report: DataReport,
    cfg: DataConfig | None = None,
    check_images: bool = True,
    decode: bool | None = None,
) -> Record | None:
    """A cleaned copy of ``rec``, or ``None`` if it is unusable. Counts go to ``report``.

    Limits from ``cfg`` (default: the library's ``DataConfig()``); ``decode`` (default
    ``cfg.decode_check``) fully decodes the image instead of reading its header.
    """
    cfg = cfg or DataConfig()
    decode = cfg.decode_check if decode is None else decode
    width, height = rec.width, rec.height
    if check_images:
        try:
            width, height, repairs = check_image(rec, cfg, decode)
        except ImageError as e:
            log.debug("skip %s", e)
            report.add(e.kind)
            return None
        for k in repairs:
            report.add(k)
    mc = cfg.max_caption_chars
    captions = [c for c in (clean_text(t, report, "empty_caption", mc) for t in rec.captions) if c]

    def box_ok(b: Box) -> Box | None:
        nb, kind = clean_box(b, width, height)
        if kind:
            report.add(kind)
        return nb

    objects = []
    for o in rec.objects:
        b = box_ok(o.box)
        p = clean_text(o.phrase, report, "empty_phrase", mc) if b else None
        if b and p:
            objects.append(Obj(b, p))
    refs = []
    for r in rec.refs:
        b = box_ok(r.box)
        p = clean_text(r.phrase, report, "empty_phrase", mc) if b else None
        if b and p:
            refs.append(Ref(p, b))
    questions = []
    for qa in rec.questions:
        q = clean_text(qa.q, report, "empty_caption", mc)
        answers = [a for a in (" ".join(str(a).split()) for a in qa.answers) if a]
        if q and not answers:
            report.add("no_answer")  # a question nothing can be learned from or scored against
        if q and answers:
            questions.append(QA(q, answers, qa.type))
    if not (captions or questions or refs):
        report.add("no_text")
        return None
    return replace(
        rec, captions=captions, objects=objects, refs=refs, questions=questions, width=width, height=height
    )


def validate_records(
    records: Iterable[Record],
    cfg: DataConfig | None = None,
    report: DataReport | None = None,
    check_images: bool = True,
    decode: bool | None = None,
    reader: DataReport | None = None,
) -> tuple[list[Record], DataReport]:
    """Pre-scan: (usable cleaned records in input order, report). See the module docstring.

    ``reader`` is what the reader of ``records`` skipped (by default ``records.report`` when they
    came from a reader as a ``RecordList``): its counts become part of the report, and
    ``records_in`` counts every entry the reader read, the ones that never became records included.
    """
    report = report if report is not None else DataReport()
    reader = reader if reader is not None else getattr(records, "report", None)
    if reader is not None:
        add_reader_skips(report, reader)
    good = []
    for rec in records:
        report.records_in += 1
        r = validate_record(rec, report, cfg, check_images, decode)
        if r is not None:
            good.append(r)
    report.records_out += len(good)
    s = report.summary()
    if s["skipped"] or s["repaired"] or s["dropped_items"]:
        log.warning("data: %d of %d records usable; %s", len(good), s["records_in"], s["counts"])
    return good, report


def add_reader_skips(report: DataReport, reader: DataReport) -> None:
    """Fold a reader's report into a pre-scan's: its counts, and as ``records_in`` the entries that
    never became records (the records themselves are counted by the pre-scan as it meets them)."""
    report.counts.update(reader.counts)
    report.records_in += reader.records_in - reader.records_out

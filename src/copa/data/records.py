"""The one record type every reader produces and every dataset consumes.

Boxes are ``(x, y, w, h)`` in pixels of the original image (COCO convention, top-left origin).
``to_dict``/``from_dict`` give a JSON-able form; ``from_dict`` also accepts the plain ALBEF/mPLUG
entries ``{"image", "caption"}`` (caption a string or a list) and ``{"image", "question", "answer"}``.

Parsing is strict by default (a malformed field raises ``ValueError`` or ``TypeError``). Readers
pass a ``Counter`` as ``drops``: then a malformed optional field (a box that is not 4 numbers,
``objects`` that is not a list, ``answers: null``, a caption that is not a string, ...) is dropped
and counted there as ``malformed_field``, and the rest of the record is kept.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

Box = tuple[float, float, float, float]
T = TypeVar("T")

MALFORMED_FIELD = "malformed_field"


def _number(v: Any) -> float:
    # bool is an int subclass and a string iterates into characters: neither is a coordinate
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"not a number: {v!r}")
    return float(v)


def parse_box(v: Any) -> Box:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise ValueError(f"a box is 4 numbers [x, y, w, h], got {v!r}")
    x, y, w, h = (_number(t) for t in v)
    return (x, y, w, h)


def parse_text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{where} must be a string, got {v!r}")
    return v


def _items(value: Any, parse: Callable[[Any], T], drops: Counter[str] | None, where: str) -> list[T]:
    """Parse a list field item by item; without ``drops`` the first bad item (or a non-list) raises."""
    if not isinstance(value, list):
        _bad(drops, f"{where} must be a list, got {value!r}")
        return []
    out = []
    for item in value:
        try:
            out.append(parse(item))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            _bad(drops, f"{where}: {e}")
    return out


def _bad(drops: Counter[str] | None, msg: str) -> None:
    if drops is None:
        raise ValueError(msg)
    drops[MALFORMED_FIELD] += 1


@dataclass
class Obj:
    """One annotated object: a box and the phrase that names it ("small red circle")."""

    box: Box
    phrase: str

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "phrase": self.phrase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        box = parse_box(d.get("box", d.get("bbox")))
        return cls(box=box, phrase=parse_text(d.get("phrase", ""), "phrase"))


@dataclass
class QA:
    """A question with one or more reference answers (VQA soft score uses all of them)."""

    q: str
    answers: list[str] = field(default_factory=list)
    # what kind of question ("color", "count", ...; VQA v2's ``question_type``): evaluation reports
    # accuracy per type beside each type's majority answer; "" = by its first two words
    type: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"q": self.q, "answers": list(self.answers)}
        if self.type:
            d["type"] = self.type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QA:
        answers = d.get("answers", d.get("answer", []))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list):
            raise TypeError(f"answers must be a list of strings, got {answers!r}")
        q = parse_text(d.get("q", d.get("question", "")), "question")
        kind = d.get("type", d.get("question_type", ""))
        if not isinstance(kind, str):
            raise TypeError(f"a question's type must be a string, got {kind!r}")
        return cls(q=q, answers=[parse_text(a, "answer") for a in answers], type=kind.strip())


@dataclass
class Ref:
    """A referring expression and the box it denotes (visual grounding)."""

    phrase: str
    box: Box

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "phrase": self.phrase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ref:
        phrase = parse_text(d.get("phrase", d.get("text", "")), "phrase")
        return cls(phrase=phrase, box=parse_box(d.get("box", d.get("bbox"))))


@dataclass
class Record:
    """One image and everything said about it. Only ``image`` is required.

    ``image`` is a file path (already resolved against the image root by the reader). Streamed
    records (webdataset) carry the encoded bytes in ``data`` instead; ``data`` is never serialised.
    """

    image: str
    captions: list[str] = field(default_factory=list)
    objects: list[Obj] = field(default_factory=list)
    questions: list[QA] = field(default_factory=list)
    refs: list[Ref] = field(default_factory=list)
    image_id: str | int = ""
    width: int | None = None
    height: int | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image": self.image,
            "image_id": self.image_id,
            "captions": list(self.captions),
            "objects": [o.to_dict() for o in self.objects],
            "questions": [q.to_dict() for q in self.questions],
            "refs": [r.to_dict() for r in self.refs],
        }
        if self.width is not None and self.height is not None:
            d["width"], d["height"] = int(self.width), int(self.height)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], drops: Counter[str] | None = None) -> Record:
        """Parse a record dict (see the module docstring for ``drops``). A record without a usable
        ``image`` (a non-empty string) raises either way: it is not a record."""
        if not isinstance(d, dict):
            raise TypeError(f"a record is a JSON object, got {type(d).__name__}")
        image = d.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"a record needs an image path, got {image!r}")
        caps = d.get("captions", d.get("caption", []))
        if isinstance(caps, str):
            caps = [caps]
        questions = _items(d.get("questions", []), QA.from_dict, drops, "questions")
        if "question" in d:  # ALBEF/mPLUG VQA entry
            questions += _items([d], QA.from_dict, drops, "question")
        image_id = d.get("image_id", "")
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
            _bad(drops, f"image_id must be a string or an integer, got {image_id!r}")
            image_id = ""
        return cls(
            image=image,
            captions=_items(caps, lambda c: parse_text(c, "caption"), drops, "captions"),
            objects=_items(d.get("objects", []), Obj.from_dict, drops, "objects"),
            questions=questions,
            refs=_items(d.get("refs", []), Ref.from_dict, drops, "refs"),
            image_id=image_id,
            width=_side(d.get("width"), drops, "width"),
            height=_side(d.get("height"), drops, "height"),
        )


def _side(v: Any, drops: Counter[str] | None, where: str) -> int | None:
    """An image side in pixels, or None (unknown: the image header tells it)."""
    if v is None:
        return None
    usable = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not usable or v <= 0 or v != int(v):
        _bad(drops, f"{where} must be a positive integer, got {v!r}")
        return None
    return int(v)


class RecordList(list[Record]):
    """The records a reader produced, with ``report``: what it had to skip or drop on the way
    (a ``copa.data.badinput.DataReport``; ``records_in`` counts the entries it read)."""

    report: Any = None

"""The one record type every reader produces and every dataset consumes.

Boxes are ``(x, y, w, h)`` in pixels of the original image (COCO convention, top-left origin).
``to_dict``/``from_dict`` give a JSON-able form; ``from_dict`` also accepts the plain ALBEF/mPLUG
entries ``{"image", "caption"}`` (caption a string or a list) and ``{"image", "question", "answer"}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]


def _box(v: Any) -> Box:
    x, y, w, h = (float(t) for t in v)
    return (x, y, w, h)


@dataclass
class Obj:
    """One annotated object: a box and the phrase that names it ("small red circle")."""

    box: Box
    phrase: str

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "phrase": self.phrase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(box=_box(d.get("box", d.get("bbox"))), phrase=str(d.get("phrase", "")))


@dataclass
class QA:
    """A question with one or more reference answers (VQA soft score uses all of them)."""

    q: str
    answers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"q": self.q, "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QA:
        answers = d.get("answers", d.get("answer", []))
        if isinstance(answers, str):
            answers = [answers]
        return cls(q=str(d.get("q", d.get("question", ""))), answers=[str(a) for a in answers])


@dataclass
class Ref:
    """A referring expression and the box it denotes (visual grounding)."""

    phrase: str
    box: Box

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "phrase": self.phrase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ref:
        return cls(phrase=str(d.get("phrase", d.get("text", ""))), box=_box(d.get("box", d.get("bbox"))))


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
    def from_dict(cls, d: dict[str, Any]) -> Record:
        caps = d.get("captions", d.get("caption", []))
        if isinstance(caps, str):
            caps = [caps]
        questions = [QA.from_dict(q) for q in d.get("questions", [])]
        if "question" in d:  # ALBEF/mPLUG VQA entry
            questions.append(QA.from_dict(d))
        return cls(
            image=str(d["image"]),
            captions=[str(c) for c in caps],
            objects=[Obj.from_dict(o) for o in d.get("objects", [])],
            questions=questions,
            refs=[Ref.from_dict(r) for r in d.get("refs", [])],
            image_id=d.get("image_id", ""),
            width=d.get("width"),
            height=d.get("height"),
        )

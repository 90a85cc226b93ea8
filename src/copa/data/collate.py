"""Collate sample dicts into a ``Batch``; texts are tokenized here, one batched call per text kind."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from copa.model.text import load_tokenizer


@dataclass
class Batch:
    """One training/eval batch. B samples, P phrases, L tokens (per text kind), N patches.

    Attributes:
        images: (B, 3, H, W) float32, normalised.
        image_ids: (B,) long, index of the distinct image (equal ids = same image).
        caption_ids, caption_mask: (B, L) long; ``captions``: the B strings.
        has_boxes: (B,) bool.
        phrase_ids, phrase_mask: (P, L) long; phrase_image: (P,) long row of the phrase's image;
            phrase_labels: (P, N) float 0/1; ``phrases``: the P strings. P may be 0.
        union_labels: (B, N) float 0/1, zeros where ``has_boxes`` is False.
        question_ids, question_mask: (B, L) long or None when no sample has a question;
            has_question: (B,) bool; answers: B lists ([] where there is no question).
        ref_ids, ref_mask: (B, L) long or None when no sample has a referring expression;
            ref_boxes: (B, 4) float normalised (cx, cy, w, h); ref_valid: (B,) bool (the box
            survived the crop); refs: B strings ("" where none).
        events: bad-input events met while building these samples (merge with
            ``DataReport.update``).
    """

    images: Tensor
    image_ids: Tensor
    caption_ids: Tensor
    caption_mask: Tensor
    captions: list[str]
    has_boxes: Tensor
    phrase_ids: Tensor
    phrase_mask: Tensor
    phrase_image: Tensor
    phrase_labels: Tensor
    phrases: list[str]
    union_labels: Tensor
    question_ids: Tensor | None = None
    question_mask: Tensor | None = None
    has_question: Tensor | None = None
    answers: list[list[str]] = field(default_factory=list)
    ref_ids: Tensor | None = None
    ref_mask: Tensor | None = None
    ref_boxes: Tensor | None = None
    ref_valid: Tensor | None = None
    refs: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _map(self, fn: Any) -> Batch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())


class Collator:
    """``collate_fn`` for the COPA datasets. Picklable: the tokenizer is loaded lazily per process.

    Args:
        tokenizer: tokenizer name for ``copa.model.text.load_tokenizer``.
        max_len: truncate every text to this many tokens (incl. [CLS]/[SEP]); pads to the longest.
    """

    def __init__(self, tokenizer: str = "minilm", max_len: int = 40) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(T,) strings → (T, L) ids, (T, L) mask, both long."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = load_tokenizer(self.tokenizer)
        enc = tok(texts, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        captions = [s["caption"] for s in samples]
        cap_ids, cap_mask = self.tokenize(captions)
        phrases = [p for s in samples for p in s["phrases"]]
        phrase_image = torch.tensor(
            [i for i, s in enumerate(samples) for _ in s["phrases"]], dtype=torch.long
        )
        num_patches = samples[0]["union_labels"].shape[0]
        if phrases:
            ph_ids, ph_mask = self.tokenize(phrases)
            ph_labels = torch.cat([s["phrase_labels"] for s in samples])
        else:
            ph_ids = ph_mask = torch.zeros(0, cap_ids.shape[1], dtype=torch.long)
            ph_labels = torch.zeros(0, num_patches)
        has_boxes = torch.tensor([bool(s["has_boxes"]) for s in samples])
        union = torch.stack([s["union_labels"] for s in samples]) * has_boxes[:, None]
        events: Counter[str] = Counter()
        for s in samples:
            events.update(s.get("events", {}))
        batch = Batch(
            images=torch.stack([s["image"] for s in samples]),
            image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            caption_ids=cap_ids,
            caption_mask=cap_mask,
            captions=captions,
            has_boxes=has_boxes,
            phrase_ids=ph_ids,
            phrase_mask=ph_mask,
            phrase_image=phrase_image,
            phrase_labels=ph_labels,
            phrases=phrases,
            union_labels=union,
            events=dict(events),
        )
        if any(s["question"] is not None for s in samples):
            batch.question_ids, batch.question_mask = self.tokenize([s["question"] or "" for s in samples])
            batch.has_question = torch.tensor([s["question"] is not None for s in samples])
            batch.answers = [list(s["answers"]) for s in samples]
        if any(s["ref"] is not None for s in samples):
            batch.ref_ids, batch.ref_mask = self.tokenize([s["ref"] or "" for s in samples])
            batch.ref_boxes = torch.stack([s["ref_box"] for s in samples])
            batch.ref_valid = torch.tensor([bool(s["ref_valid"]) for s in samples])
            batch.refs = [s["ref"] or "" for s in samples]
        return batch

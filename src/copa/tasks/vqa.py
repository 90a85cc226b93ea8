"""Visual question answering: the question is the TPD query; question + image go through the
encoders and the fusion; the decoder generates the answer (greedy or beam), or ranks a list of
candidate answers by log-likelihood.

Input format: the JSON record list of ``copa data synth`` (SPEC §3), one record per image::

    [{"image": "images/test/000000.png",
      "questions": [{"q": "how many objects are there?", "answers": ["3"]},
                    {"q": "what color is the star?", "answers": ["red", "red", "orange"]}]}, ...]

(the ALBEF/mPLUG entries ``{"image", "question", "answer"}`` are read too). Each question becomes
one (image, question) sample. Fine-tuning target: the most frequent reference answer, as
``[CLS] answer`` -> ``answer [SEP]``. Metric: ``copa.tasks.metrics.vqa_score`` (VQA soft score with
several references, exact match with one); baseline: always answering the majority answer of the
training split (of the evaluated split when the training split cannot be read).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from copa.config import Config
from copa.data.collate import Batch
from copa.data.records import QA, Record
from copa.model.copa import COPAModel
from copa.tasks.base import (
    EvalEnv,
    EvalResult,
    Task,
    expanded_dataset,
    gather_predictions,
    iter_shard,
    only,
    throughput,
)
from copa.tasks.generation import generate, lm_loss, rank_candidates, tokenize
from copa.tasks.metrics import accuracy_by_type, majority_answer, normalize_answer, vqa_score

log = logging.getLogger(__name__)


def training_answer(answers: list[str]) -> str:
    """The most frequent reference answer (ties: the first listed)."""
    return Counter(answers).most_common(1)[0][0]


def question_type(qa: QA) -> str:
    """``qa.type`` as the data names it, else the question's first two words: VQA v2 groups its
    questions by how they open ("what color", "how many", "is there")."""
    return qa.type or " ".join(re.findall(r"[\w']+", qa.q.lower())[:2]) or "other"


def split_answers(cfg: Config, split: str) -> list[list[str]] | None:
    """Reference answers of every question of ``cfg.data.<split>`` (records only, no images);
    None when the split cannot be read."""
    typed = split_typed_answers(cfg, split)
    return None if typed is None else [answers for _, answers in typed]


def split_typed_answers(cfg: Config, split: str) -> list[tuple[str, list[str]]] | None:
    """(``question_type``, reference answers) of every question of ``cfg.data.<split>``; None when
    the split cannot be read."""
    path = getattr(cfg.data, split)
    version: tuple[int, int] | None = None  # a directory (COCO) or a shard pattern: read, not remembered
    if Path(path).is_file():
        stat = Path(path).stat()
        version = (stat.st_mtime_ns, stat.st_size)
    try:
        if version is None:
            return _read_answers(path, cfg.data.format, cfg.data.image_root)
        return [(t, list(a)) for t, a in _file_answers(path, cfg.data.format, cfg.data.image_root, version)]
    except (OSError, ValueError) as e:
        log.warning("cannot read the %s split for VQA answers: %s", split, e)
        return None


def _read_answers(path: str, fmt: str, image_root: str) -> list[tuple[str, list[str]]]:
    from copa.data.readers import read_records

    recs = read_records(path, fmt, image_root)
    return [(question_type(qa), qa.answers) for r in recs for qa in r.questions if qa.answers]


@functools.lru_cache(maxsize=8)
def _file_answers(
    path: str, fmt: str, image_root: str, version: tuple[int, int]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``_read_answers`` of a file as it is at ``version`` (mtime, size): every evaluation reads the
    training split's answers for its majority baselines, and parsing 2,000 records took 0.4 s of a
    5-s VQA evaluation, 14 times in the demo."""
    return tuple((t, tuple(a)) for t, a in _read_answers(path, fmt, image_root))


def load_answer_list(spec: str, cfg: Config) -> list[str]:
    """Candidate answers: "train" (every distinct answer of the training split) or a JSON list file."""
    if spec == "train":
        answers = split_answers(cfg, "train")
        if not answers:
            raise ValueError("answer list 'train': the training split has no answers")
        seen: dict[str, str] = {}
        for refs in answers:
            for a in refs:
                seen.setdefault(normalize_answer(a), a)
        return sorted(seen.values())
    data = json.loads(Path(spec).read_text())
    if not isinstance(data, list) or not data:
        raise ValueError(f"answer list {spec} must be a non-empty JSON list of strings")
    return [str(a) for a in data]


def question_context(model: COPAModel, images: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """images (B, 3, H, W), question ids / mask (B, L) -> decoder context (B, S, D) and mask (B, S):
    the question queries the TPD and is fused with the kept patches."""
    return model(images, ids, mask).context()


class VQATask(Task):
    name = "vqa"

    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        def expand(rec: Record) -> list[Record]:
            return [only(rec, questions=[qa]) for qa in rec.questions]

        return expanded_dataset(cfg, split, train, image_size, patch_size, expand, self.options.random_crop)

    def context(self, model: COPAModel, batch: Batch) -> tuple[Tensor, Tensor]:
        """Question-queried fused states -> decoder context (B, S, D) and mask (B, S)."""
        return question_context(model, batch.images, batch.question_ids, batch.question_mask)

    def decoder_targets(self, dataset: Any) -> list[str] | None:
        records = self.listed_records(dataset)
        return None if records is None else [a for r in records for qa in r.questions for a in qa.answers]

    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        ctx, cmask = self.context(model, batch)
        ids, mask = tokenize(model, [training_answer(a) for a in batch.answers], ctx.device)
        return {"loss": lm_loss(model, ctx, cmask, ids, mask)}

    @torch.no_grad()
    def evaluate(self, model: COPAModel, dataset: Any, env: EvalEnv) -> EvalResult:
        ev, opts = env.ev, self.options
        candidates = load_answer_list(opts.answer_list, env.cfg) if opts.answer_list else None
        mode = "rank" if candidates else (opts.decode or "greedy")
        ranked = (*tokenize(model, candidates, env.device), candidates) if candidates else None
        preds: list[dict[str, Any]] = []
        for idx, batch in iter_shard(dataset, env, model):
            with env.watch, env.autocast():
                answers = self._answers(model, batch.images, batch, env, mode, ranked)
            blind = (
                self._blind_answers(model, batch, env, mode, ranked)
                if ev.blind_control
                else [None] * len(answers)
            )
            for i, answer, refs, other in zip(idx, answers, batch.answers, blind, strict=True):
                rec = dataset.records[i]
                pred = {
                    "index": i,
                    "image": rec.image,
                    "question": rec.questions[0].q,
                    "type": question_type(rec.questions[0]),
                    "answers": refs,
                    "prediction": answer,
                    "score": vqa_score(answer, refs),
                    "unit": 100.0 * vqa_score(answer, refs),  # its share of ``accuracy``
                    "group": rec.image,
                }
                if other is not None:
                    pred["blind_prediction"], pred["blind_score"] = other, vqa_score(other, refs)
                preds.append(pred)
        preds, seconds = gather_predictions(preds, env.watch.seconds)
        refs = [p["answers"] for p in preds]
        train_typed = split_typed_answers(env.cfg, "train")
        train_refs = [a for _, a in train_typed] if train_typed else None
        majority = majority_answer(train_refs or refs)
        metrics = {
            "accuracy": 100.0 * sum(p["score"] for p in preds) / max(1, len(preds)),
            "decode": mode,
            "baseline_majority_answer": majority,
            "baseline_majority_from": "train" if train_refs else "evaluated split",
            "baseline_accuracy": 100.0 * sum(vqa_score(majority, r) for r in refs) / max(1, len(refs)),
            **throughput(len(preds), seconds),
            # per question type, beside always answering the type's majority answer: a model that
            # learnt only which answers each type takes scores that baseline
            "by_type": accuracy_by_type(preds, train_typed or [(p["type"], p["answers"]) for p in preds]),
        }
        blind = [p["blind_score"] for p in preds if "blind_score" in p]
        if blind:  # same questions, another image: the accuracy this model reaches without looking
            metrics["blind_accuracy"] = 100.0 * sum(blind) / len(blind)
            metrics["blind_questions"] = len(blind)
            seen = [p["score"] for p in preds if "blind_score" in p]
            metrics["accuracy_on_blind_questions"] = 100.0 * sum(seen) / len(seen)
        return EvalResult(metrics, preds)

    @staticmethod
    def _answers(
        model: COPAModel,
        images: Tensor,
        batch: Batch,
        env: EvalEnv,
        mode: str,
        ranked: tuple[Tensor, Tensor, list[str]] | None,
    ) -> list[str]:
        """The answer to each of ``batch``'s questions about ``images`` (B, 3, H, W): the best of
        ``ranked`` = (candidate ids, mask, strings) by likelihood, or generated in ``mode``."""
        ctx, cmask = question_context(model, images, batch.question_ids, batch.question_mask)
        if ranked is not None:
            best = rank_candidates(model, ctx, cmask, ranked[0], ranked[1]).argmax(1).tolist()
            return [ranked[2][j] for j in best]
        ev = env.ev
        return generate(model, ctx, cmask, mode, ev.beam_size, ev.max_new_tokens, ev.length_penalty)

    def _blind_answers(
        self,
        model: COPAModel,
        batch: Batch,
        env: EvalEnv,
        mode: str,
        ranked: tuple[Tensor, Tensor, list[str]] | None,
    ) -> list[str | None]:
        """Each question answered with the image half a batch away (None where that is the same
        image), outside the timed region."""
        b = batch.images.shape[0]
        perm = (torch.arange(b) + b // 2) % b
        other = (batch.image_ids[perm] != batch.image_ids).tolist()
        if not any(other):
            return [None] * b
        with env.autocast():
            answers = self._answers(model, batch.images[perm], batch, env, mode, ranked)
        return [a if o else None for a, o in zip(answers, other, strict=True)]

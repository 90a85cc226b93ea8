"""Image captioning: text-agnostic patch selection (no text to query with), a fixed prompt
(``TaskOptions.prompt``, default "a picture of") through the text encoder + fusion so the decoder
cross-attends to fused image-text states as in pre-training, and the decoder writes the caption.

Fine-tuning: LM loss on a random reference caption per image (``[CLS] caption`` ->
``caption [SEP]``). Evaluation: beam search (``eval.beam_size``, ``eval.length_penalty``,
``eval.max_new_tokens``; ``--decode greedy`` for greedy), then BLEU-1..4, METEOR, ROUGE-L and CIDEr
over all reference captions of each image (``copa.tasks.caption_metrics``), and the same metrics for
the trivial baseline that outputs an empty caption. Besides the JSON-lines predictions, a COCO
result file ``[{"image_id", "caption"}]`` is written (``image_id`` = image index in the split).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from copa.config import Config
from copa.data.collate import Batch
from copa.data.records import Record
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
from copa.tasks.caption_metrics import caption_scores
from copa.tasks.generation import generate, lm_loss, tokenize
from copa.train import distributed as D


class CaptionTask(Task):
    name = "caption"

    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        def expand(rec: Record) -> list[Record]:
            return [only(rec, captions=rec.captions)] if rec.captions else []

        return expanded_dataset(cfg, split, train, image_size, patch_size, expand, self.options.random_crop)

    def context(self, model: COPAModel, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) -> decoder context (B, S, D) and mask (B, S) from the prompt."""
        b = images.shape[0]
        vision = model.image_tokens(model.image_prefix(images), None)  # text-agnostic query
        ids, mask = tokenize(model, [self.options.prompt], images.device)
        txt = model.text_states(ids, mask)  # the prompt is the same for every image: encode it once
        return model.fuse(vision, txt.expand(b, -1, -1), mask.expand(b, -1)).context()

    def decoder_targets(self, dataset: Any) -> list[str] | None:
        records = self.listed_records(dataset)
        return None if records is None else [c for r in records for c in r.captions]

    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        ctx, cmask = self.context(model, batch.images)
        return {"loss": lm_loss(model, ctx, cmask, batch.caption_ids, batch.caption_mask)}

    @torch.no_grad()
    def evaluate(self, model: COPAModel, dataset: Any, env: EvalEnv) -> EvalResult:
        ev = env.ev
        mode = self.options.decode or "beam"
        preds: list[dict[str, Any]] = []
        for idx, batch in iter_shard(dataset, env, model):
            with env.watch, env.autocast():
                ctx, cmask = self.context(model, batch.images)
                captions = generate(
                    model, ctx, cmask, mode, ev.beam_size, ev.max_new_tokens, ev.length_penalty
                )
            for i, c in zip(idx, captions, strict=True):
                rec = dataset.records[i]
                preds.append(
                    {"index": i, "image_id": i, "image": rec.image, "caption": c, "references": rec.captions}
                )
        preds, seconds = gather_predictions(preds, env.watch.seconds)
        metrics: dict[str, Any] = {"decode": mode, "prompt": self.options.prompt}
        if D.is_main():  # the scorers (two java processes) run once, not per rank
            refs = {p["image_id"]: p["references"] for p in preds}
            per_image: dict[str, dict[Any, float]] = {}
            scores = caption_scores(
                refs,
                {"model": {p["image_id"]: p["caption"] for p in preds}, "empty": {i: "" for i in refs}},
                meteor=self.options.meteor,
                cider_per_image=per_image,
            )
            for p in preds:  # its share of ``cider`` (metrics.paired_bootstrap)
                p["unit"], p["group"] = per_image["model"][p["image_id"]], p["image"]
            metrics.update(scores["model"])
            metrics.update({f"baseline_{k}": v for k, v in scores["empty"].items()})
        metrics.update(throughput(len(preds), seconds))
        files = {
            "captions_coco_results.json": [
                {"image_id": p["image_id"], "caption": p["caption"]} for p in preds
            ]
        }
        return EvalResult(metrics, preds, files)

"""Visual grounding: the referring expression is the TPD query; the box head on the fused [CLS]
regresses a normalised (cx, cy, w, h) box. Loss: L1 + GIoU on samples whose box survived the
transform. Metric: accuracy at IoU >= 0.5 and mean IoU; baseline: a fixed box centred on the image
(``CENTRE_BOX``, half its width and height).

Input: JSON records with ``refs: [{"phrase", "box": [x, y, w, h] pixels}]``; each ref becomes one
(image, expression) sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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
from copa.tasks.box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou
from copa.tasks.metrics import grounding_metrics

CENTRE_BOX = (0.5, 0.5, 0.5, 0.5)  # cx, cy, w, h of the baseline box


def box_loss(
    pred: Tensor, target: Tensor, l1_weight: float = 1.0, giou_weight: float = 1.0
) -> dict[str, Tensor]:
    """pred, target: (B, 4) normalised cxcywh -> {"l1", "giou", "loss"} (means over the batch)."""
    l1 = F.l1_loss(pred.float(), target.float())
    giou = (1.0 - generalized_box_iou(cxcywh_to_xyxy(pred.float()), cxcywh_to_xyxy(target.float()))).mean()
    return {"l1": l1, "giou": giou, "loss": l1_weight * l1 + giou_weight * giou}


class GroundingTask(Task):
    name = "grounding"

    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        def expand(rec: Record) -> list[Record]:
            return [only(rec, refs=[r]) for r in rec.refs]

        return expanded_dataset(cfg, split, train, image_size, patch_size, expand, self.options.random_crop)

    def predict(self, model: COPAModel, batch: Batch) -> Tensor:
        """(B, 4) normalised cxcywh boxes for the batch's referring expressions."""
        return model.box_head(model(batch.images, batch.ref_ids, batch.ref_mask).cls)

    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        pred = self.predict(model, batch)
        valid = batch.ref_valid
        if not bool(valid.any()):  # every box cropped away: a zero loss that keeps the graph
            zero = pred.sum() * 0.0
            return {"l1": zero, "giou": zero, "loss": zero}
        return box_loss(pred[valid], batch.ref_boxes[valid])

    @torch.no_grad()
    def evaluate(self, model: COPAModel, dataset: Any, env: EvalEnv) -> EvalResult:
        preds: list[dict[str, Any]] = []
        for idx, batch in iter_shard(dataset, env, model):
            with env.watch, env.autocast():
                boxes = self.predict(model, batch).float()
            iou = box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(batch.ref_boxes.float()))
            for j, i in enumerate(idx):
                preds.append(
                    {
                        "index": i,
                        "image": dataset.records[i].image,
                        "ref": batch.refs[j],
                        "box_pred_cxcywh": boxes[j].tolist(),
                        "box_gt_cxcywh": batch.ref_boxes[j].tolist(),
                        "iou": float(iou[j]),
                    }
                )
        preds, seconds = gather_predictions(preds, env.watch.seconds)
        pred = torch.tensor([p["box_pred_cxcywh"] for p in preds]).view(-1, 4)
        gt = torch.tensor([p["box_gt_cxcywh"] for p in preds]).view(-1, 4)
        metrics: dict[str, Any] = grounding_metrics(pred, gt)
        base = grounding_metrics(torch.tensor([CENTRE_BOX]).expand_as(gt), gt)
        metrics.update({f"baseline_{k}": v for k, v in base.items()})
        metrics["baseline_box_cxcywh"] = list(CENTRE_BOX)
        metrics.update(throughput(len(preds), seconds))
        return EvalResult(metrics, preds)

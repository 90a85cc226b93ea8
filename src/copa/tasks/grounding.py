"""Visual grounding: the referring expression is the TPD query; the patch-anchored box head
(``copa.model.heads.PatchBoxHead``) scores every kept patch for holding the object's centre and
regresses a normalised (cx, cy, w, h) box from it. Loss, on samples whose box survived the
transform (``patch_box_loss``): cross-entropy of the patch scores against the kept patches inside the
true box (centre-weighted; or the one nearest its centre), plus L1 + GIoU of their boxes. Metric:
accuracy at IoU >= 0.5 and mean IoU; baseline: a fixed box centred on the image (``CENTRE_BOX``,
half its width and height).

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
from copa.model.heads import GroundingOutput
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
BOX_TARGETS = ("centre", "inside")  # which patches a box trains (``patch_box_loss``)


def patch_box_loss(
    out: GroundingOutput, target: Tensor, valid: Tensor, targets: str = "inside"
) -> dict[str, Tensor]:
    """Loss of the patch-anchored head. target: (B, 4) normalised cxcywh; valid: (B,) bool.

    ``targets="centre"``: the responsible patch is the kept patch whose centre is nearest the true
    box centre (the patch holding it, unless the selector dropped that one): its score is trained by
    cross-entropy over the kept patches, its box by L1 + GIoU.
    ``targets="inside"`` (FCOS-style): every kept patch whose centre lies inside the true box is a
    positive too, weighted by closeness to the box centre (exp(-(dx/(w/2))^2 - (dy/(h/2))^2)): the
    scores learn a soft target over the object's patches and every positive regresses the box, so a
    sample supervises 1-4 patches instead of one and the target does not flip between two patches
    when the centre sits on their border. Both are one computation: the weighted cross-entropy and
    box losses over a distribution of positives (one-hot for ``centre``).
    """
    if targets not in BOX_TARGETS:
        raise ValueError(f"box targets must be one of {BOX_TARGETS}, got {targets!r}")
    scores, boxes, centres, target = (
        out.scores[valid],
        out.boxes[valid],
        out.centres[valid],
        target[valid].float(),
    )
    offset = centres - target[:, None, :2]  # (B, K, 2)
    resp = offset.square().sum(-1).argmin(1)  # (B,)
    positive = F.one_hot(resp, scores.shape[1]).bool()  # (B, K)
    half = (target[:, None, 2:] / 2).clamp_min(1e-6)
    if targets == "inside":
        positive |= (offset.abs() < half).all(-1)
    # (B, K), a distribution over the positives; a softmax, so a box far smaller than a patch (every
    # weight exp(-hundreds)) still gives its nearest patch weight 1, not 0/0
    closeness = -(offset / half).square().sum(-1)
    q = closeness.masked_fill(~positive, float("-inf")).softmax(1)
    ce = -(q * scores.log_softmax(1)).sum(1).mean()
    b, k = q.shape
    flat_target = target[:, None].expand(-1, k, -1).reshape(-1, 4)
    l1 = (boxes - target[:, None]).abs().mean(-1)  # (B, K)
    giou = 1.0 - generalized_box_iou(cxcywh_to_xyxy(boxes.reshape(-1, 4)), cxcywh_to_xyxy(flat_target)).view(
        b, k
    )
    l1, giou = (q * l1).sum(1).mean(), (q * giou).sum(1).mean()
    return {"patch_ce": ce, "l1": l1, "giou": giou, "loss": ce + l1 + giou}


def ground_pairs(model: COPAModel, images: Tensor, ids: Tensor, mask: Tensor) -> GroundingOutput:
    """images (B, 3, H, W), referring expressions ids / mask (B, L) -> the box head's output; the
    expression queries the TPD. ``.box`` (B, 4) is normalised (cx, cy, w, h)."""
    return model.ground(model(images, ids, mask))


class GroundingTask(Task):
    name = "grounding"

    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        def expand(rec: Record) -> list[Record]:
            return [only(rec, refs=[r]) for r in rec.refs]

        return expanded_dataset(cfg, split, train, image_size, patch_size, expand, self.options.random_crop)

    def forward(self, model: COPAModel, batch: Batch) -> GroundingOutput:
        return ground_pairs(model, batch.images, batch.ref_ids, batch.ref_mask)

    def predict(self, model: COPAModel, batch: Batch) -> Tensor:
        """(B, 4) normalised cxcywh boxes for the batch's referring expressions."""
        return self.forward(model, batch).box

    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        out = self.forward(model, batch)
        valid = batch.ref_valid
        if not bool(valid.any()):  # every box cropped away: a zero loss that keeps the graph
            zero = out.scores.sum() * 0.0 + out.boxes.sum() * 0.0
            return {"patch_ce": zero, "l1": zero, "giou": zero, "loss": zero}
        return patch_box_loss(out, batch.ref_boxes, valid, self.options.box_targets)

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
                        "unit": 100.0 * float(iou[j] >= 0.5),  # its share of ``acc@0.5``
                        "group": dataset.records[i].image,
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

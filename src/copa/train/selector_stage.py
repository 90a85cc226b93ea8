"""A PTA stage for the selector alone, on a pre-trained model.

Everything but the first-stage selector is frozen; only the images that carry boxes are read; the
loss is exactly pre-training's PTA loss (``PretrainObjective.pta_loss``: phrase queries, phrase-level
negatives, the text-agnostic query on the union of boxes). Why a stage of its own: PTA needs a few
hundred updates of the selector before it becomes text-specific (BENCHMARKS.md), and a full
pre-training step costs ~3 s on a 2-core CPU, while a selector-only step (the frozen ViT prefix of 16
images and the selector) costs ~0.1 s. The demo's pre-training rows then share one trunk and differ
only in this stage: none (TPD without PTA), the ~5% boxed images (COPA), or boxes on every image.
Joint PTA during pre-training (``train.loss_weights.pta``) stays the library's default.

Since everything the selector reads is frozen, a step's inputs (the ViT prefix of its images and the
phrases' pooled text) depend only on the batch. With ``views`` > 0 the stage computes them once for
``views`` augmented views of every boxed image and replays those batches in a fresh seeded order on
each pass, so a step costs only the selector's forward and backward (~8x cheaper on the demo's model,
BENCHMARKS.md) and the same wall time buys more updates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from copa.config import Config
from copa.errors import UserError
from copa.model.copa import COPAModel
from copa.train.losses import PretrainObjective, phrase_queries
from copa.train.optim import build_optimizer, trainable_only
from copa.train.sampler import EpochSeeded, loader_generator

log = logging.getLogger(__name__)


class PoolSampler(Sampler[int]):
    """Endless shuffled passes over ``pool`` (indices into a dataset of ``n``), as ``EpochSeeded``
    keys ``epoch * n + i`` so every epoch draws its own augmentations."""

    def __init__(self, n: int, pool: list[int], seed: int) -> None:
        self.n, self.pool, self.seed = n, list(pool), seed

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            for j in np.random.default_rng([self.seed, 104729, epoch]).permutation(len(self.pool)):
                yield epoch * self.n + self.pool[j]
            epoch += 1


@dataclass
class SelectorStageResult:
    steps: int
    boxed_images: int
    first_loss: float
    last_loss: float  # mean of the last 10 steps
    wall_s: float
    views: int = 0  # augmented views of each boxed image replayed (0: a fresh one every epoch)
    distinct_batches: int = 0  # batches whose prefix and phrase text were computed


class StepInputs:
    """The frozen inputs of the selector stage's steps: ``next()`` -> (batch, prefix (B, 1+N, D),
    phrase queries (P, Dt)). The first ``distinct`` batches come from ``batches`` and are computed
    once; later steps replay them, each pass in its own seeded order. ``distinct`` None: every step
    is a new batch (nothing kept)."""

    def __init__(self, model: COPAModel, batches: Iterator[Any], distinct: int | None, seed: int) -> None:
        self.model, self.batches, self.distinct, self.seed = model, batches, distinct, seed
        self.kept: list[tuple[Any, Tensor, Tensor]] = []
        self.order: list[int] = []
        self.passes = 0

    def compute(self, batch: Any) -> tuple[Any, Tensor, Tensor]:
        with torch.no_grad():
            prefix, query = self.model.image_prefix(batch.images), phrase_queries(self.model, batch)
        # PTA reads the labels, not the pixels: a kept batch holds its prefix (~1/12 of the images'
        # memory at the demo's sizes), not its images
        return dataclasses.replace(batch, images=batch.images[:0]), prefix, query

    def __next__(self) -> tuple[Any, Tensor, Tensor]:
        if self.distinct is None or len(self.kept) < self.distinct:
            item = self.compute(next(self.batches))
            if self.distinct is not None:
                self.kept.append(item)
            return item
        if not self.order:
            self.passes += 1
            rng = np.random.default_rng([self.seed, 7919, self.passes])
            self.order = rng.permutation(len(self.kept)).tolist()
        return self.kept[self.order.pop()]


def boxed_loader(dataset: Any, cfg: Config, batch_size: int) -> DataLoader:
    """Batches of the training images that carry boxes (with pre-training's augmentations)."""
    from copa.data.collate import Collator

    pool = [i for i, r in enumerate(getattr(dataset, "records", [])) if r.objects]
    if not pool:
        raise UserError(
            f"no record of {cfg.data.train} carries boxes (objects): the selector stage has "
            "nothing to learn from"
        )
    return DataLoader(
        EpochSeeded(dataset, cfg.seed),
        batch_size=min(batch_size, len(pool)),
        sampler=PoolSampler(len(dataset), pool, cfg.seed),
        num_workers=cfg.data.num_workers,
        collate_fn=Collator(cfg.model.text.tokenizer, cfg.model.text.max_len),
        generator=loader_generator(cfg.seed),
        drop_last=True,
    )


def train_selector(
    model: COPAModel,
    cfg: Config,
    steps: int,
    batch_size: int = 16,
    lr: float | None = None,
    views: int = 0,
) -> SelectorStageResult:
    """Train ``model``'s first-stage selector with PTA for ``steps`` steps of ``batch_size`` boxed
    images (in place; every other parameter keeps its value). ``lr`` defaults to
    ``train.lr_selector`` (else ``train.lr``). ``views`` > 0: replay ``views`` augmented views of
    each boxed image, their frozen inputs computed once (module docstring); 0: a fresh augmentation
    every epoch."""
    from copa.train.trainer import build_datasets

    if not any(p.numel() for p in model.selector_parameters()):
        raise UserError(f"selector {model.cfg.select.selector!r} has no parameters: nothing for PTA to train")
    if steps <= 0:
        raise UserError(f"the selector stage needs a positive number of steps, got {steps}")
    if views < 0:
        raise UserError(f"views must be 0 (a fresh augmentation every epoch) or positive, got {views}")
    t = cfg.train
    dataset = build_datasets(cfg, ("train",))["train"]
    loader = boxed_loader(dataset, cfg, batch_size)
    boxed = sum(1 for r in dataset.records if r.objects)
    per_epoch = len(loader.sampler.pool) // loader.batch_size  # type: ignore[attr-defined]
    distinct = min(steps, views * per_epoch) if views else steps
    params = model.selector_parameters()
    with trainable_only(model, params):
        # eval mode: the frozen parts run as at inference (no dropout / drop-path); the selector has none
        model.eval()
        objective = PretrainObjective(
            model,
            {"pta": 1.0},
            pta_pos_weight=t.pta_pos_weight,
            pta_contrast=t.pta_contrast,
            pta_other_weight=t.pta_other_weight,
        )
        # one group, decay on every tensor, Adam's default β2, warm-up then a cosine to zero: at a
        # constant rate validation specificity swung by ±0.05 from one 100 steps to the next; decayed it
        # ends where it stops rising (BENCHMARKS.md, session 8)
        group = {
            "params": params,
            "lr": lr or t.lr_selector or t.lr,
            "weight_decay": t.weight_decay,
        }
        opt, sched = build_optimizer([group], steps, warmup=steps // 10, floor=0.0, betas=(0.9, 0.999))
        losses: list[float] = []
        t0 = time.perf_counter()
        inputs = StepInputs(model, iter(loader), distinct if distinct < steps else None, cfg.seed)
        for step in range(1, steps + 1):
            batch, prefix, query = next(inputs)
            loss = objective.pta_loss(prefix, batch, query)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % max(1, steps // 5) == 0 or step == 1:
                log.info("selector stage step %d/%d: pta %.4f", step, steps, losses[-1])
    return SelectorStageResult(
        steps, boxed, losses[0], float(np.mean(losses[-10:])), time.perf_counter() - t0, views, distinct
    )


def run_stage(
    init: str | Path,
    cfg: Config,
    out: str | Path,
    steps: int,
    batch_size: int = 16,
    lr: float | None = None,
    views: int = 0,
) -> dict[str, Any]:
    """``copa pta-stage``: load ``init``, train its selector, save ``out/model`` and
    ``out/summary.json`` (the stage's losses and the validation selection metrics before and after).
    The data is read with the model's own image size and tokenizer. Returns the summary."""
    from copa.evaluation import pta_eval
    from copa.model.copa import load

    model = load(init)
    cfg = dataclasses.replace(cfg, model=model.cfg)
    keep = model.keep_ratios[0]
    before = pta_eval(model, cfg, "val", keep)
    res = train_selector(model, cfg, steps, batch_size, lr, views)
    after = pta_eval(model, cfg, "val", keep)
    out = Path(out)
    model.save_pretrained(out / "model")
    summary = {"init": str(init), **dataclasses.asdict(res), "val_before": before, "val_after": after}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

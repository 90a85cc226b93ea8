"""What every downstream task shares: options, the task interface, dataset expansion, evaluation
environment (device, precision, timing) and rank-split evaluation loaders.

A task is a small object with three methods, used by one fine-tuning loop (``copa.tasks.finetune``)
and one evaluation driver:

- ``build_dataset(cfg, split, train, image_size, patch_size)`` -> a map-style dataset of sample
  dicts (``copa.data.dataset``), one sample per (image, question / referring expression / ...);
- ``loss(model, batch)`` -> ``{"loss": scalar, ...}`` on a collated ``copa.data.collate.Batch``;
- ``evaluate(model, dataset, env)`` -> ``EvalResult`` (metrics incl. baselines, predictions).

Datasets reuse ``PretrainDataset`` through ``copa.data.build.build_dataset``: each record is
cleaned once (``validate_records``), then expanded into derived records that hold exactly one
question / ref, so the sample builder's image loading, transforms, flip-aware left/right swapping
and the collator all apply unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from copa.config import Config, EvalConfig
from copa.data.build import Expand, build_dataset
from copa.data.collate import Batch, Collator
from copa.data.dataset import PretrainDataset
from copa.data.records import Record
from copa.model.copa import COPAModel
from copa.train import distributed as D
from copa.utils.device import sync

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a picture of"


@dataclass
class TaskOptions:
    """Task settings that are not (yet) part of ``Config`` (CLI flags of finetune / evaluate).

    - ``prompt``: captioning prompt fed to the text encoder + fusion (the decoder's context);
    - ``decode``: "greedy" | "beam" | None (task default: VQA greedy, captioning beam);
    - ``answer_list``: VQA answer-list ranking instead of free generation: a JSON file with a list
      of answers, or "train" for every answer of ``cfg.data.train``; None = generate;
    - ``itc_weight``: retrieval final score = ITM log-odds + itc_weight * ITC cosine similarity;
    - ``meteor``: compute METEOR (starts a java process; other caption metrics never need it);
    - ``random_crop``: random resized crop when fine-tuning. Off by default: the texts of these
      tasks describe the whole image (counts, positions, every object), which a crop falsifies.
      Horizontal flips (with left/right swapped in the texts) stay on;
    - ``box_targets``: grounding, which patches a true box trains: ``inside`` (every patch inside
      it, centre-weighted; ``copa.tasks.grounding``) or ``centre`` (the one nearest its centre). Inside
      learns faster: after 120 steps validation acc@0.5 50.1 | 49.9 against 47.5 | 48.1 (seeds 0 | 1;
      BENCHMARKS.md, session 9).
    """

    prompt: str = DEFAULT_PROMPT
    decode: str | None = None
    answer_list: str | None = None
    itc_weight: float = 1.0
    meteor: bool = True
    random_crop: bool = False
    box_targets: str = "inside"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """metrics: flat JSON-able dict (accuracy metrics, ``baseline_*``, throughput, keep ratio);
    predictions: one JSON-able dict per sample / query (written as JSON lines); files: further
    JSON outputs by file name (e.g. a COCO result file)."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)


class Stopwatch:
    """Accumulates wall time of the model work only (``with watch: ...``); syncs CUDA so that
    asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._t0 = device, 0.0, 0.0

    def __enter__(self) -> Self:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0


@dataclass
class EvalEnv:
    """Everything an ``evaluate`` needs besides model and data."""

    cfg: Config
    device: torch.device
    dtype: torch.dtype
    options: TaskOptions
    watch: Stopwatch

    @property
    def ev(self) -> EvalConfig:
        return self.cfg.eval

    def autocast(self) -> Any:
        from copa.utils.device import autocast

        return autocast(self.device, self.dtype)

    def collator(self, model: COPAModel) -> Collator:
        return Collator(model.cfg.text.tokenizer, model.cfg.text.max_len)


# --------------------------------------------------------------------------------- datasets
def expanded_dataset(
    cfg: Config,
    split: str,
    train: bool,
    image_size: int,
    patch_size: int,
    expand: Expand,
    random_crop: bool = False,
) -> PretrainDataset:
    """``PretrainDataset`` over the expanded records of a split (validation runs once per record,
    not per derived sample). Without ``random_crop`` the training transform is resize + flip."""
    ds = build_dataset(cfg.data, split, image_size, patch_size, train, expand=expand, random_crop=random_crop)
    assert isinstance(ds, PretrainDataset)  # expanded records are always in memory
    return ds


def only(rec: Record, **fields: Any) -> Record:
    """A derived record of the same image carrying only ``fields`` (objects dropped: the tasks do
    not use patch labels, and the sample builder then skips their work)."""
    base = {"captions": [], "objects": [], "questions": [], "refs": []}
    return dataclasses.replace(rec, **{**base, **fields})


# --------------------------------------------------------------------------------- evaluation
def shard_indices(n: int) -> list[int]:
    """This rank's share of ``range(n)`` (round robin; shares differ in size by at most one)."""
    return list(range(D.rank(), n, D.world_size()))


def eval_loader(
    dataset: Any, indices: list[int], batch_size: int, collate: Callable[[list[Any]], Any], workers: int = 0
) -> DataLoader:
    """Deterministic, in-order loader over ``indices`` of ``dataset``; keeps the last partial batch."""
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
    )


def iter_shard(
    dataset: Any, env: EvalEnv, model: COPAModel, batch_size: int | None = None
) -> Iterator[tuple[list[int], Batch]]:
    """(dataset indices, batch on device) over this rank's share of ``dataset``."""
    idx = shard_indices(len(dataset))
    bs = batch_size or env.ev.batch_size
    loader = eval_loader(dataset, idx, bs, env.collator(model), env.cfg.data.num_workers)
    for start, batch in zip(range(0, len(idx), bs), loader, strict=True):
        yield idx[start : start + bs], batch.to(env.device)


def gather_predictions(preds: list[dict[str, Any]], seconds: float) -> tuple[list[dict[str, Any]], float]:
    """The one collective of a per-sample evaluation: every rank's predictions (sorted back into
    dataset order by their ``index``) and the slowest rank's model time."""
    parts = D.gather_objects((preds, seconds))
    allp = sorted((p for part, _ in parts for p in part), key=lambda p: p["index"])  # type: ignore[union-attr]
    return allp, max(float(s) for _, s in parts)  # type: ignore[misc]


_WARMED: set[tuple[object, ...]] = set()  # the shapes ``warm_up`` has run in this process


@torch.no_grad()
def warm_up(model: COPAModel, env: EvalEnv, runs: int | None = None, text_len: int = 12) -> None:
    """Untimed passes through every part of the model on random inputs of the evaluation's shapes.

    First calls pay one-time costs (kernel selection, allocator growth, lazy init) that on a CPU can
    take longer than the evaluation itself; like a benchmark's warm-up runs, they are kept out of
    the reported throughput. ``runs`` defaults to ``eval.warmup_runs``. Paid once per process for
    each architecture, keep ratio, batch size, device and precision: a later evaluation of the
    same shapes (the demo's ablation rows) finds them paid.
    """
    b, size = env.ev.batch_size, model.cfg.vision.image_size
    n = env.ev.warmup_runs if runs is None else runs
    shapes = (repr(model.cfg), tuple(model.keep_ratios), b, str(env.device), str(env.dtype))
    if n <= 0 or shapes in _WARMED:
        return
    _WARMED.add(shapes)
    images = torch.randn(b, 3, size, size, device=env.device)
    ids = torch.randint(1, model.cfg.text.vocab_size, (b, text_len), device=env.device)
    mask = torch.ones_like(ids)
    # on copies of the selectors: a random selector's draws are the evaluation's, whether or not it
    # warmed up first
    with model.selecting_with(model.selectors_copy()):
        for _ in range(n):
            with env.autocast():
                model.encode_image(images)
                fused = model(images, ids, mask)
                model.itm_logits(fused)
                model.ground(fused)
                model.lm_logits(model.decode(ids[:, :4], None, *fused.context()))


def throughput(n: int, seconds: float) -> dict[str, float]:
    """Samples per second of model time (data loading excluded)."""
    return {"num_samples": n, "model_time_s": round(seconds, 4), "samples_per_s": n / max(seconds, 1e-9)}


class Task:
    """Base class: subclasses set ``name`` and implement the three methods."""

    name = "task"

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()

    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        raise NotImplementedError

    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def evaluate(self, model: COPAModel, dataset: Any, env: EvalEnv) -> EvalResult:
        raise NotImplementedError

    def decoder_targets(self, dataset: Any) -> list[str] | None:
        """Every text the decoder is trained to write on ``dataset`` (a fine-tune's output vocabulary
        is their tokens); None: the task does not decode, or the data cannot be listed (a stream)."""
        return None

    def listed_records(self, dataset: Any) -> list[Record] | None:
        """The records of a map-style dataset; None (with a warning) for a stream."""
        records = getattr(dataset, "records", None)
        if records is None:
            log.warning("%s: streamed data, targets not listed: every token stays writable", self.name)
        return records


class TaskObjective(nn.Module):
    """A task's loss as one module (what DDP wraps): ``forward(batch) -> {"loss", ...}``."""

    def __init__(self, model: COPAModel, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.task.loss(self.model, batch)

"""Warm start of the image stem from labelled objects (``copa stem-stage``).

The paper starts from a pretrained CLIP ViT; VLP models before it started from a detector trained on
object and attribute labels (BUTD, VinVL). Trained from scratch on image-caption pairs alone, the
demo's ViT never learns shape: its caption objectives can be met by colour, size and place, and even
with shape given as a label on every object it learns it slowly (BENCHMARKS.md, sessions 7, 8, 13).
This stage is the miniature of that visual pre-training: before pre-training, the stem (the conv
stem or patch embedding, nothing above it) learns to name the objects of an *auxiliary* set of
labelled images — for every object, the words of its phrase ("small red hexagon") as a bag of labels,
predicted from the stem's output cell under the object's centre. The stem is cheap (a tenth of a
trunk step), so a few hundred steps fit a demo; the pre-training that follows starts from it.

Like a pretrained encoder, the stem is also saved on its own (``stem.safetensors``: weights and
normalisation statistics, the stage's word head and vocabulary, the settings it fits and how it was
made), so a later stage can start from it (``--stem``) or only load and measure it (``--steps 0``).
The demo does the latter with the stem shipped in ``copa.assets`` (2,000 steps on 10,000 images:
validation phrase accuracy 0.95 against 0.65 for the 400 steps a demo can afford, and VQA 66 -> 74;
BENCHMARKS.md, session 20).

An object larger than a cell also shows on its other cells, which the centre's label leaves
untrained; ``cover`` labels every cell its box covers by that share of the cell's area as well. On
the demo's scenes (a quarter of a cell; BENCHMARKS.md, session 16) that gave a better trunk and
captioner (validation ITC 1.36 -> 0.97, CIDEr 2.07 -> 2.12, retrieval 79.8 -> 83.5, seed 1) but
lower text specificity (0.52 -> 0.46, under the target: every object then stands out on all its
cells) and no better VQA (65.1 -> 63.0), so the demo keeps the centre's cell only.

Any records with object boxes and phrases serve (a synthetic set made with another seed, Visual
Genome's regions, COCO instances); records without objects are skipped and counted, images that
cannot be read are skipped and counted. Only the stem's weights and normalisation statistics change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from copa.config import Config, DataConfig
from copa.data.image_io import ImageError, load_image
from copa.data.records import Record
from copa.errors import UserError
from copa.model.copa import COPAModel
from copa.preprocess import ImageTransform
from copa.train.optim import build_optimizer, trainable_only
from copa.train.sampler import loader_generator
from copa.train.selector_stage import PoolSampler
from copa.utils.device import autocast, resolve_precision

log = logging.getLogger(__name__)

WORD = re.compile(r"[a-z]+")


def phrase_words(phrase: str) -> list[str]:
    """The distinct lower-case words of an object's phrase, in order."""
    return list(dict.fromkeys(WORD.findall(phrase.lower())))


def vocabulary(records: Sequence[Record], min_count: int = 1) -> list[str]:
    """The sorted words that name at least ``min_count`` objects of ``records``."""
    counts = Counter(w for r in records for o in r.objects for w in phrase_words(o.phrase))
    return sorted(w for w, c in counts.items() if c >= min_count)


@dataclass(frozen=True)
class ObjectLabel:
    """One labelled cell: a grid cell of the stem's output that shows an object, and the object's
    words' indices."""

    cell: int
    words: tuple[int, ...]


def covered_cells(box: tuple[float, float, float, float], grid: int, cover: float) -> list[int]:
    """The cells of a ``grid`` x ``grid`` grid over the unit square that ``box`` (x, y, w, h, as
    shares of the image) covers by at least ``cover`` of a cell's area, row-major."""
    x0, y0 = box[0] * grid, box[1] * grid
    x1, y1 = x0 + box[2] * grid, y0 + box[3] * grid
    cells = []
    for gy in range(max(0, math.floor(y0)), min(grid, math.ceil(y1))):
        for gx in range(max(0, math.floor(x0)), min(grid, math.ceil(x1))):
            area = (min(x1, gx + 1) - max(x0, gx)) * (min(y1, gy + 1) - max(y0, gy))
            if area >= cover:
                cells.append(gy * grid + gx)
    return cells


def object_labels(
    rec: Record, index: dict[str, int], grid: int, size: tuple[int, int], cover: float | None = None
) -> list[ObjectLabel]:
    """The labelled cells of ``rec`` (its image ``size`` (w, h) pixels) on a ``grid`` x ``grid``
    stem output (the image is resized to a square, as the model's transform does): for each object,
    the cell under its centre and, with ``cover``, every other cell its box covers by at least that
    share of the cell's area. Objects whose centre lies outside the image or whose phrase has no
    word of the vocabulary are left out."""
    out = []
    sw, sh = max(size[0], 1), max(size[1], 1)
    for o in rec.objects:
        x, y, w, h = o.box
        cx, cy = (x + w / 2) / sw, (y + h / 2) / sh
        words = tuple(index[t] for t in phrase_words(o.phrase) if t in index)
        if not (0.0 <= cx < 1.0 and 0.0 <= cy < 1.0) or not words:
            continue
        centre = int(cy * grid) * grid + int(cx * grid)
        cells = {centre}
        if cover is not None:
            cells.update(covered_cells((x / sw, y / sh, w / sw, h / sh), grid, cover))
        out.extend(ObjectLabel(c, words) for c in sorted(cells))
    return out


class LabelledImages(Dataset):
    """Item ``key`` (any int; taken modulo the number of images) -> ((3, H, W) image, its
    ``ObjectLabel``s on a ``grid`` x ``grid`` stem output), or the record's index when its image
    cannot be read (the collate passes it on, the stage counts it).

    The stage has no augmentation, so an image looks the same every epoch: the first
    ``cache_bytes`` worth of decoded images are kept (as float16) and not decoded again — at the
    demo's 4,000 images of 128 px (0.4 GB) a step costs ~0.12 s instead of ~0.16 s (emulated AVX2 fp32)."""

    def __init__(
        self,
        records: Sequence[Record],
        index: dict[str, int],
        grid: int,
        transform: ImageTransform,
        cfg: DataConfig,
        cache_bytes: int = 1 << 30,
        cover: float | None = None,
    ) -> None:
        self.records, self.index, self.grid, self.cover = list(records), index, grid, cover
        self.transform, self.cfg = transform, cfg
        per_image = 2 * 3 * transform.image_size**2
        self.cache_limit = cache_bytes // per_image
        self.cache: dict[int, tuple[Tensor, list[ObjectLabel]] | int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> tuple[Tensor, list[ObjectLabel]] | int:
        i = int(key) % len(self.records)
        if i in self.cache:
            item = self.cache[i]
            return item if isinstance(item, int) else (item[0].float(), item[1])
        rec = self.records[i]
        try:
            loaded = load_image(rec, self.cfg)
        except ImageError as e:
            log.warning("stem stage: %s: %s", rec.image, e)
            self.cache[i] = i  # an unreadable image costs no memory: remembered whatever the limit
            return i
        labels = object_labels(rec, self.index, self.grid, loaded.orig_size, self.cover)
        out = self.transform(loaded.image), labels
        if i < self.cache_limit:
            self.cache[i] = (out[0].half(), out[1])
        return out


def collate(items: list[Any]) -> tuple[Tensor, list[list[ObjectLabel]], list[int]]:
    """-> (B, 3, H, W) images, their labels, and the indices of the records that were unreadable."""
    good = [it for it in items if not isinstance(it, int)]
    bad = [it for it in items if isinstance(it, int)]
    if not good:
        return torch.zeros(0), [], bad
    return torch.stack([im for im, _ in good]), [lab for _, lab in good], bad


class WordHead(nn.Module):
    """The stage's classifier, thrown away after it: LayerNorm + Linear from a stem cell (D) to one
    logit per vocabulary word."""

    def __init__(self, width: int, words: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, words)

    def forward(self, cells: Tensor) -> Tensor:
        """(O, D) -> (O, V)"""
        return self.proj(self.norm(cells))


def object_cells(grid_features: Tensor, labels: Sequence[list[ObjectLabel]]) -> Tensor:
    """(B, D, g, g) stem output, per-image labels -> (O, D) features at the objects' cells."""
    rows = torch.tensor([b for b, labs in enumerate(labels) for _ in labs], dtype=torch.long)
    cells = torch.tensor([o.cell for labs in labels for o in labs], dtype=torch.long)
    flat = grid_features.flatten(2).transpose(1, 2)  # (B, g*g, D)
    return flat[rows, cells]


def targets(labels: Sequence[list[ObjectLabel]], words: int) -> Tensor:
    """(O, V) multi-hot targets of every object of the batch."""
    out = torch.zeros(sum(len(labs) for labs in labels), words)
    k = 0
    for labs in labels:
        for o in labs:
            out[k, list(o.words)] = 1.0
            k += 1
    return out


def word_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy against an object's words as one distribution ((O, V) logits, (O, V)
    multi-hot) -> scalar, the mean over objects. Validation phrase accuracy at peak LR 2e-3: 0.62
    against 0.57 for a softmax per word against the words that do not name the object; per-word
    sigmoids reached 0.47 at 1e-3, where this reached 0.57 (BENCHMARKS.md, session 13)."""
    return F.cross_entropy(logits, target / target.sum(1, keepdim=True))


@dataclass
class StemStageResult:
    steps: int
    images: int  # images with an object named by a word of the vocabulary
    objects: int  # labelled cells read over all steps (every cell an object covers enough)
    vocabulary: list[str]
    first_loss: float | None  # None: no step (a saved stem measured only)
    last_loss: float | None  # mean of the last 10 steps
    wall_s: float
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    val: dict[str, float] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def word_accuracy(
    stem: nn.Module, head: WordHead, data: LabelledImages, vocab_size: int, batch: int = 64
) -> dict[str, float]:
    """On held-out labelled images: ``phrase_accuracy`` (an object's top-k words, k its number of
    words, are exactly its words) and ``word_recall`` (share of its words in that top-k), beside
    ``phrase_accuracy_majority`` (every object given the k most frequent words of the set)."""
    was = stem.training
    stem.eval()
    hit = right = total = words = 0
    freq = torch.zeros(vocab_size)
    pairs: list[tuple[Tensor, ObjectLabel]] = []
    try:
        for i in range(0, len(data), batch):
            imgs, labels, _ = collate([data[j] for j in range(i, min(i + batch, len(data)))])
            if not any(labels):
                continue
            feats = object_cells(stem(imgs), labels)
            logits = head(feats)
            for lg, o in zip(logits, (o for labs in labels for o in labs), strict=True):
                pairs.append((lg, o))
                freq[list(o.words)] += 1
    finally:
        stem.train(was)
    for lg, o in pairs:
        top = set(lg.topk(len(o.words)).indices.tolist())
        own = set(o.words)
        right += len(top & own)
        words += len(own)
        hit += int(top == own)
        total += 1
    if not total:
        return {}
    order = freq.argsort(descending=True).tolist()
    majority = sum(int(set(order[: len(o.words)]) == set(o.words)) for _, o in pairs)
    return {
        "objects": float(total),
        "phrase_accuracy": hit / total,
        "word_recall": right / words,
        "phrase_accuracy_majority": majority / total,
    }


def labelled(records: Sequence[Record], index: dict[str, int], skipped: Counter[str]) -> list[Record]:
    """The records with an object whose phrase has a word of ``index`` (the others counted)."""
    keep = []
    for r in records:
        n = sum(1 for o in r.objects if any(t in index for t in phrase_words(o.phrase)))
        if not n:
            skipped["records_without_labelled_objects"] += 1
            continue
        skipped["objects_without_a_known_word"] += len(r.objects) - n
        keep.append(r)
    return keep


def train_stem(
    model: COPAModel,
    cfg: Config,
    records: Sequence[Record],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    val_records: Sequence[Record] = (),
    cover: float | None = None,
    start: SavedStem | None = None,
) -> tuple[StemStageResult, WordHead]:
    """Train ``model``'s image stem (in place; nothing else changes) to name the objects of
    ``records`` for ``steps`` steps of ``batch_size`` images, AdamW at ``lr`` after a 5% warm-up, at
    every cell an object covers by ``cover`` of its area (None: at its centre's cell only); then
    measure its word accuracy on ``val_records`` with the stage's own head, at the objects' centre
    cells. ``start``: a saved stem already loaded into ``model`` (``apply_stem``), whose head and
    vocabulary the stage goes on with; then ``steps`` may be 0 (only the measurement). Returns the
    result and the head."""
    if steps < 0 or (steps == 0 and start is None):
        raise UserError(f"the stem stage needs a positive number of steps, got {steps}")
    if batch_size <= 0:
        raise UserError(f"the stem stage needs a positive batch size, got {batch_size}")
    if cover is not None and not 0.0 < cover <= 1.0:
        raise UserError(f"the stem stage's cover is a share of a cell's area in (0, 1], got {cover}")
    vocab = start.vocabulary if start is not None else vocabulary(records)
    if not vocab:
        raise UserError("no record carries an object with a phrase: the stem stage has nothing to learn")
    index = {w: i for i, w in enumerate(vocab)}
    skipped: Counter[str] = Counter()
    recs = labelled(records, index, skipped)
    if steps and not recs:
        raise UserError("no record carries an object named by the saved stem's words: nothing to learn")
    transform = ImageTransform.from_config(model.cfg)
    stem = model.vision.patch_embed
    torch.manual_seed(cfg.seed)
    head = WordHead(model.vision.cfg.width, len(vocab))
    if start is not None:
        head.load_state_dict(start.head)
    losses: list[float] = []
    objects = 0
    unreadable: set[int] = set()
    t0 = time.perf_counter()
    if steps:
        data = LabelledImages(recs, index, model.grid, transform, cfg.data, cover=cover)
        loader = DataLoader(
            data,
            batch_size=min(batch_size, len(recs)),
            sampler=PoolSampler(len(recs), list(range(len(recs))), cfg.seed),
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            generator=loader_generator(cfg.seed),
        )
        objects = _train_loop(model, cfg, head, loader, steps, lr, losses, unreadable, len(recs))
    skipped["unreadable_images"] = len(unreadable)
    wall = time.perf_counter() - t0
    val: dict[str, float] = {}
    if val_records:
        vr = labelled(val_records, index, Counter())
        if vr:
            val = word_accuracy(
                stem, head, LabelledImages(vr, index, model.grid, transform, cfg.data), len(vocab)
            )
    result = StemStageResult(
        steps,
        len(recs),
        objects,
        vocab,
        losses[0] if losses else None,
        float(np.mean(losses[-10:])) if losses else None,
        wall,
        {k: v for k, v in skipped.items() if v},
        val,
    )
    return result, head


def _train_loop(
    model: COPAModel,
    cfg: Config,
    head: WordHead,
    loader: DataLoader,
    steps: int,
    lr: float,
    losses: list[float],
    unreadable: set[int],
    n_records: int,
) -> int:
    """``steps`` updates of the stem and ``head`` over ``loader``; appends each loss to ``losses``
    and each unreadable record's index to ``unreadable``; returns the labelled cells read."""
    stem = model.vision.patch_embed
    vocab_size = head.proj.out_features
    params = [*stem.parameters(), *head.parameters()]
    objects = empty = 0
    with trainable_only(model, params):
        stem.train()
        group = {"params": params, "lr": lr, "weight_decay": cfg.train.weight_decay}
        # a short warm-up, then a constant rate: the stage ends while the stem is still learning fast
        # (validation phrase accuracy 0.44 -> 0.73 from step 200 to 400), and a cosine to zero over the
        # same steps ended at 0.57 against 0.69-0.71 (BENCHMARKS.md, session 13)
        opt, sched = build_optimizer([group], steps, warmup=steps // 20, floor=1.0)
        dtype = resolve_precision(cfg.train.precision, torch.device("cpu"))
        batches = iter(loader)
        step = 0
        while step < steps:
            imgs, labs, bad = next(batches)
            unreadable.update(bad)
            if not any(labs):  # every image of the batch unreadable, or no object centre inside it
                empty += 1
                if empty > 2 * n_records // loader.batch_size + 2:  # two passes without a label
                    raise UserError(
                        f"the stem stage read {empty} batches without a labelled object: "
                        f"{len(unreadable)} of {n_records} images unreadable, the others' object "
                        "centres outside their images"
                    )
                continue
            empty = 0
            with autocast(torch.device("cpu"), dtype):
                feats = object_cells(stem(imgs), labs)
                logits = head(feats).float()
            loss = word_loss(logits, targets(labs, vocab_size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            objects += logits.shape[0]
            losses.append(float(loss.detach()))
            if step % max(1, steps // 5) == 0 or step == 1:
                log.info("stem stage step %d/%d: word loss %.4f", step, steps, losses[-1])
    model.train(model.training)  # a frozen conv stem goes back to eval mode as the model wants
    return objects


STEM_FILE = "stem.safetensors"
_FORMAT = "copa-stem"


@dataclass(frozen=True)
class SavedStem:
    """A stem written by the stage (``OUT/stem.safetensors``): its weights and normalisation
    statistics, the stage's word head and vocabulary (so a later stage can go on, or measure it), the
    settings of the model it fits (``signature``) and how it was made (``info``)."""

    stem: dict[str, Tensor]
    head: dict[str, Tensor]
    vocabulary: list[str]
    signature: dict[str, Any]
    info: dict[str, Any]


def stem_signature(model: COPAModel) -> dict[str, Any]:
    """The settings a stem's weights depend on: which stem, its patch size and width."""
    v = model.vision.cfg
    return {"stem": v.stem, "patch_size": v.patch_size, "width": v.width}


def save_stem(
    path: str | Path, model: COPAModel, head: WordHead, vocab: list[str], info: dict[str, Any]
) -> None:
    """Write ``model``'s stem, ``head`` and ``vocab`` to one safetensors file (atomically), with
    ``info`` (JSON-able provenance) in its metadata."""
    tensors = {f"stem.{k}": v for k, v in model.vision.patch_embed.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    meta = {
        "format": _FORMAT,
        "version": "1",
        "vocabulary": json.dumps(vocab),
        "signature": json.dumps(stem_signature(model)),
        "info": json.dumps(info),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_stem(path: str | Path) -> SavedStem:
    """Read a file written by ``save_stem``; anything else is a ``UserError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--stem {path}: no such file (`copa stem-stage` writes OUT/{STEM_FILE})")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"its metadata says format {meta.get('format')!r}, not {_FORMAT!r}")
        saved = SavedStem(
            stem={k[5:]: v for k, v in tensors.items() if k.startswith("stem.")},
            head={k[5:]: v for k, v in tensors.items() if k.startswith("head.")},
            vocabulary=json.loads(meta["vocabulary"]),
            signature=json.loads(meta["signature"]),
            info=json.loads(meta.get("info", "{}")),
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"--stem {path}: not a stem written by `copa stem-stage` ({e})") from e
    if not saved.stem or not saved.head or not saved.vocabulary:
        raise UserError(f"--stem {path}: the file lacks the stem's weights, its head or its vocabulary")
    return saved


def apply_stem(model: COPAModel, saved: SavedStem, name: str = "the saved stem") -> None:
    """Load ``saved``'s weights into ``model``'s stem; a stem made for other settings is a
    ``UserError`` that names them."""
    want = stem_signature(model)
    diff = {k: (saved.signature.get(k), v) for k, v in want.items() if saved.signature.get(k) != v}
    if diff:
        got = ", ".join(f"model.vision.{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise UserError(
            f"{name} was made for another image stem ({got}); train one for these settings with "
            "`copa stem-stage --records ...` (the demo: `copa demo --train-stem`)"
        )
    try:
        model.vision.patch_embed.load_state_dict(saved.stem, strict=True)
    except RuntimeError as e:
        raise UserError(f"{name} does not fit this model's stem: {e}") from e


def run_stem_stage(
    cfg: Config,
    records: str | Path | None,
    out: str | Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    init: str | Path | None = None,
    cover: float | None = None,
    stem: str | Path | None = None,
) -> dict[str, Any]:
    """``copa stem-stage``: build the configured model (or load ``init``), train its stem on the
    labelled objects of ``records`` (any format ``copa.data.readers`` reads), and save ``out/model``
    (the starting point of ``copa pretrain --init``), ``out/stem.safetensors`` (the stem alone, with
    its head: what ``stem`` reads) and ``out/summary.json``. ``stem``: start from that saved stem
    instead of the model's own; with 0 ``steps`` (and no ``records``) the stage only puts it into the
    model and measures it. Word accuracy is measured on ``cfg.data.val`` when it carries objects.
    Returns the summary."""
    from copa.data.readers import read_records
    from copa.model.copa import build_model, load

    start = load_stem(stem) if stem is not None else None
    if records is None and steps:
        raise UserError(
            "the stem stage needs --records to train on (only --steps 0 with --stem goes without)"
        )
    torch.manual_seed(cfg.seed)  # the fresh model's weights: the same run gives the same stem
    model = load(init).train() if init else build_model(cfg.model)
    cfg = dataclasses.replace(cfg, model=model.cfg)
    if start is not None:
        apply_stem(model, start, f"--stem {stem}")
    recs = read_records(records, cfg.data.format, cfg.data.image_root) if records is not None else []
    val: list[Record] = []
    if cfg.data.val and Path(cfg.data.val).exists():
        val = list(read_records(cfg.data.val, cfg.data.format, cfg.data.image_root))
    res, head = train_stem(model, cfg, recs, steps, batch_size, lr, val, cover, start)
    out = Path(out)
    model.save_pretrained(out / "model")
    before = start.info if start is not None else {}
    info = dict(before)  # 0 steps: the saved stem's provenance, measured again below
    if steps:
        info = {
            "steps": int(before.get("steps", 0)) + steps,
            "records": str(records),
            "images": res.images,
            "batch": batch_size,
            "lr": lr,
            "cover": cover,
            "seed": cfg.seed,
            "precision": str(resolve_precision(cfg.train.precision, torch.device("cpu"))),
            "continued": before or None,
        }
    info["val"] = res.val
    save_stem(out / STEM_FILE, model, head, res.vocabulary, info)
    summary = {
        "records": str(records) if records is not None else None,
        "init": str(init) if init else None,
        "stem": str(stem) if stem is not None else None,
        "cover": cover,
        **dataclasses.asdict(res),
        "saved": info,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

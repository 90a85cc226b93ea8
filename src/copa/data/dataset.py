"""Pre-training datasets: a record + its image → one sample dict (tokenization is left to collate).

Sample dict (``N`` = patches of the model image, ``M`` = surviving boxes, ``m ≤ max_phrases``):

==================  =============================================================================
``image``           (3, H, W) float32, normalised
``image_id``        int, index of the distinct image (same image path → same id)
``caption``         str: random caption in training, the first in evaluation
``boxes``           (M, 4) float32 xywh pixels of the model image (all surviving object boxes)
``has_boxes``       bool: the record has objects and at least one survived the crop
``phrases``         list[str] of length m, their ``phrase_labels`` (m, N) float32 0/1
``union_labels``    (N,) float32: union of the labels of all M boxes
``question``        str | None, ``answers`` list[str]
``ref``             str | None, ``ref_box`` (4,) float32 normalised (cx, cy, w, h), ``ref_valid`` bool
``events``          dict[str, int]: bad-input events met while building this sample
==================  =============================================================================

After a horizontal flip every text of the sample has "left" and "right" swapped.

Randomness comes from a numpy generator seeded by a draw from torch's global generator, which
DataLoader seeds per worker and per epoch, so ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from copa.config import CLIP_MEAN, CLIP_STD, DataConfig
from copa.data.badinput import DataReport, validate_record, validate_records
from copa.data.image_io import ImageError, load_image
from copa.data.patch_labels import box_to_patch_labels, grid_size, union_labels
from copa.data.records import Record
from copa.data.shards import ShardDataset, stable_id
from copa.data.transforms import ImageBoxTransform, swap_left_right
from copa.errors import DataSourceError

log = logging.getLogger(__name__)

Sample = dict[str, Any]


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class SampleBuilder:
    """Record → sample dict (see the module docstring). Picklable; raises ``ImageError``.

    Everything but the model's image and patch size comes from ``cfg``: crop, flip, box visibility,
    patch-label tau, phrases per sample, normalisation and the image limits of ``load_image``.
    """

    def __init__(
        self, cfg: DataConfig, image_size: int | Sequence[int], patch_size: int, train: bool
    ) -> None:
        self.image_size = _size(image_size)
        self.patch_size = patch_size
        self.train = train
        self.cfg = cfg
        self.tau = cfg.patch_tau
        self.max_phrases = cfg.max_phrases
        self.num_patches = int(np.prod(grid_size(self.image_size, patch_size)))
        self.transform = ImageBoxTransform(
            self.image_size,
            train,
            tuple(cfg.crop_scale),
            tuple(cfg.crop_ratio),
            cfg.hflip,
            cfg.min_box_visible,
            tuple(cfg.mean or CLIP_MEAN),  # a bare DataConfig(): the default model's
            tuple(cfg.std or CLIP_STD),
        )

    def _pick(self, n: int, rng: np.random.Generator) -> int | None:
        if n == 0:
            return None
        return int(rng.integers(n)) if self.train else 0

    def __call__(self, rec: Record, image_id: int, rng: np.random.Generator) -> Sample:
        ld = load_image(rec, self.cfg)
        qi = self._pick(len(rec.questions), rng)
        ri = self._pick(len(rec.refs), rng)
        ci = self._pick(len(rec.captions), rng)
        # PTA's phrases: the objects', and in training with ``pta_refs`` the referring expressions of
        # the same boxed image ("the leftmost object"), whose boxes are the same annotation; evaluation
        # keeps the object phrases, which the selection metrics are defined on
        refs = rec.refs if self.cfg.pta_refs and self.train and rec.objects else []
        texts = [o.phrase for o in rec.objects] + [r.phrase for r in refs]
        boxes = [o.box for o in rec.objects] + [r.box for r in refs]
        boxes += [rec.refs[ri].box] if ri is not None else []
        sx, sy = ld.scale
        src = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
        aug = self.transform(ld.image, src, rng)
        fix = swap_left_right if aug.flipped else (lambda t: t)

        n_obj, n_ph = len(rec.objects), len(texts)
        kept = np.flatnonzero(aug.keep[:n_obj])
        obj_boxes = torch.from_numpy(aug.boxes[kept]).float()
        usable = np.flatnonzero(aug.keep[:n_ph])  # the kept objects first, then the kept refs
        ph_labels = box_to_patch_labels(
            torch.from_numpy(aug.boxes[usable]).float(), self.image_size, self.patch_size, self.tau
        )
        labels = ph_labels[: len(kept)]
        order = rng.permutation(len(usable)) if self.train else np.arange(len(usable))
        if not refs:
            chosen = order[: self.max_phrases]
        else:
            # each box once per sample (its object's phrase or one of its refs): PTA's phrase-level
            # negatives are the image's other boxes, and two names of one box are not negatives
            seen: set[tuple[float, ...]] = set()
            picked: list[int] = []
            for j in order:
                box = tuple(np.round(aug.boxes[usable[j]], 2).tolist())
                if box not in seen and len(picked) < self.max_phrases:
                    seen.add(box)
                    picked.append(int(j))
            chosen = np.asarray(picked, dtype=np.int64)

        H, W = self.image_size
        ref_box = torch.zeros(4)
        ref_valid = False
        if ri is not None and aug.keep[n_ph]:
            x, y, w, h = aug.boxes[n_ph]
            ref_box = torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], dtype=torch.float32)
            ref_valid = True
        qa = rec.questions[qi] if qi is not None else None
        return {
            "image": aug.image,
            "image_id": image_id,
            "caption": fix(rec.captions[ci]) if ci is not None else "",
            "boxes": obj_boxes,
            "has_boxes": len(kept) > 0,
            "phrases": [fix(texts[usable[j]]) for j in chosen],
            "phrase_labels": ph_labels[torch.from_numpy(chosen).long()],
            "union_labels": union_labels(labels, self.num_patches),
            "question": fix(qa.q) if qa else None,
            "answers": [fix(a) for a in qa.answers] if qa else [],
            "ref": fix(rec.refs[ri].phrase) if ri is not None else None,
            "ref_box": ref_box,
            "ref_valid": ref_valid,
            "events": {},
        }


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class PretrainDataset(Dataset):
    """Map-style dataset over records.

    Args:
        records: records from any reader (``copa.data.build.build_dataset`` reads a config split).
        cfg: data config (crop, flip, min box visible, tau, max phrases, mean/std, image limits).
        image_size: model image size (int or (H, W)); patch_size: ViT patch size.
        train: random crop/flip and random caption/phrase/question choice; else deterministic.
        validate: pre-scan records (``validate_records`` under ``cfg``'s limits): cleans texts/boxes,
            drops unusable records; its counts are in ``self.report``. ``decode`` (default
            ``cfg.decode_check``) fully decodes in the pre-scan.
        report: with ``validate=False``: the counts of the pre-scan the records already passed
            (default: none, every record counted as usable).

    A record whose image fails to load at ``__getitem__`` despite the pre-scan (e.g. truncated data
    behind a valid header) is replaced by the next loadable record; the sample's ``events`` say so
    (``substituted`` plus the failure kind), so it is counted, never silent.
    """

    def __init__(
        self,
        records: Sequence[Record],
        cfg: DataConfig,
        image_size: int | Sequence[int],
        patch_size: int,
        train: bool,
        validate: bool = True,
        decode: bool | None = None,
        report: DataReport | None = None,
    ) -> None:
        if validate:
            recs, self.report = validate_records(records, cfg, decode=decode)
        else:
            recs = list(records)
            self.report = report or DataReport(records_in=len(recs), records_out=len(recs))
        if not recs:
            found = self.report.summary()["counts"] or "no records given"
            raise DataSourceError(f"no usable records: {found}")
        self.records = recs
        ids: dict[str, int] = {}
        self.image_ids = [ids.setdefault(r.image, len(ids)) for r in recs]
        self.num_images = len(ids)
        self.builder = SampleBuilder(cfg, image_size, patch_size, train)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.get(index, _rng())

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        """Sample ``index`` augmented with ``rng`` (the trainer seeds it per epoch and index, so a
        resumed run reproduces every augmentation)."""
        events: Counter[str] = Counter()
        n = len(self.records)
        for k in range(n):
            j = (index + k) % n
            try:
                sample = self.builder(self.records[j], self.image_ids[j], rng)
            except ImageError as e:
                log.warning("sample %d unusable, substituting the next one: %s", j, e)
                events[e.kind] += 1
                continue
            if k:
                events["substituted"] += 1
            sample["events"] = dict(events)
            return sample
        raise RuntimeError("no record of the dataset has a loadable image")


class StreamingPretrainDataset(IterableDataset):
    """``ShardDataset`` + validation + ``SampleBuilder``: samples streamed from webdataset shards.

    Each record is validated as it streams (header check, text/box cleaning); its events, and those
    of the shard reader, ride on the next sample produced by the same worker. They are counted in
    the first epoch only (every later epoch re-reads the same bad input), so a run's total counts
    each bad input once; events left at the end of the first epoch ride on the first sample of the
    next. ``image_id`` is a stable hash of the record's id.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        cfg: DataConfig,
        image_size: int | Sequence[int],
        patch_size: int,
        train: bool,
        **shard_kw: Any,
    ) -> None:
        super().__init__()
        self.shards = ShardDataset(urls, **shard_kw)
        self.cfg = cfg
        self.builder = SampleBuilder(cfg, image_size, patch_size, train)
        self._pending = DataReport()

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def __iter__(self) -> Any:
        pending = self._pending if self.shards.epoch == 0 else DataReport()  # a throw-away after epoch 0
        for rec in self.shards.records(pending):
            # header check only: the builder decodes the image next anyway (decode_check is for the
            # in-memory pre-scan, which otherwise would meet a truncated file only at training time)
            good = validate_record(rec, pending, self.cfg, decode=False)
            if good is None:
                continue
            try:
                sample = self.builder(good, stable_id(rec.image_id), _rng())
            except ImageError as e:
                pending.add(e.kind)
                continue
            pending.records_out += 1
            sample["events"] = self._pending.take()
            yield sample
        if self._pending.counts:
            log.warning(
                "bad input at the end of a shard stream (counted with the next sample): %s",
                dict(self._pending.counts),
            )


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    tokenizer: str = "minilm",
    max_len: int = 40,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """DataLoader with the COPA collate; a DistributedSampler when torch.distributed is initialised
    (map-style datasets; shard streams split themselves). Call ``loader.sampler.set_epoch`` per epoch
    when it is a DistributedSampler."""
    from copa.data.collate import Collator

    sampler = None
    iterable = isinstance(dataset, IterableDataset)
    if not iterable and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None and not iterable,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collator(tokenizer, max_len),
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
    )

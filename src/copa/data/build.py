"""From a data config to a dataset: the one read → validate → dataset chain.

``build_dataset(cfg.data, split, image_size, patch_size)`` reads ``cfg.data.<split>`` with its
reader, pre-scans the records under the config's limits (``validate_records``) and builds the
dataset, whose ``report`` counts every bad input of the source: what the reader could not turn
into a record and what the pre-scan skipped, repaired or dropped. Pre-training, the downstream tasks,
the selector stage and the evaluation helpers all build their data here.

Webdataset shards stream (``StreamingPretrainDataset``; its counts travel with the batches) unless
the records are needed in memory: derived per-task records (``expand``), a cut (``max_records``) or
``stream=False``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from copa.config import DataConfig
from copa.data.badinput import validate_records
from copa.data.dataset import PretrainDataset, StreamingPretrainDataset
from copa.data.readers import detect_format, read_records
from copa.data.records import Record

log = logging.getLogger(__name__)

Expand = Callable[[Record], list[Record]]
"""A cleaned record -> the records a task trains on (e.g. one per question); may be empty."""


def build_dataset(
    cfg: DataConfig,
    split: str,
    image_size: int | Sequence[int],
    patch_size: int,
    train: bool | None = None,
    *,
    expand: Expand | None = None,
    random_crop: bool = True,
    max_records: int | None = None,
    stream: bool = True,
) -> PretrainDataset | StreamingPretrainDataset:
    """The dataset of ``cfg.<split>`` (``"train"``, ``"val"`` or ``"test"``).

    Args:
        cfg: the data config: source, format, image root, limits, augmentation, normalisation.
        split: which path of ``cfg`` to read.
        image_size: model image size (int or (H, W)); patch_size: ViT patch size.
        train: training transforms and random text choice (default: ``split == "train"``).
        expand: derive the task's records from each cleaned record (validation runs once per
            source record, not per derived one); a split without any derived record is an error.
        random_crop: ``False`` makes the training transform resize + flip only (the texts of the
            downstream tasks describe the whole image, which a crop would falsify).
        max_records: use only the first records the reader returns (its skips are still counted).
        stream: stream webdataset shards (when nothing above needs the records in memory).
    """
    path = getattr(cfg, split)
    train = split == "train" if train is None else train
    return make_dataset(
        path,
        cfg,
        image_size,
        patch_size,
        train,
        expand=expand,
        random_crop=random_crop,
        max_records=max_records,
        stream=stream,
        what=f"{split} split ({path})",
    )


def make_dataset(
    path: str,
    cfg: DataConfig,
    image_size: int | Sequence[int],
    patch_size: int,
    train: bool,
    *,
    expand: Expand | None = None,
    random_crop: bool = True,
    max_records: int | None = None,
    stream: bool = True,
    what: str = "",
) -> PretrainDataset | StreamingPretrainDataset:
    """``build_dataset`` for a path not in the config (``cfg.format`` and the rest still apply)."""
    what = what or str(path)
    if train and not random_crop:
        # scale = ratio = 1: the crop is the whole image, so only the resize and the flip remain
        cfg = dataclasses.replace(cfg, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    if stream and expand is None and max_records is None and _is_shards(path, cfg.format):
        return StreamingPretrainDataset(path, cfg, image_size, patch_size, train)
    records = read_records(path, cfg.format, cfg.image_root)
    # the reader's skips travel explicitly: a cut (or any list operation) returns a plain list
    reader = records.report
    good, report = validate_records(records[:max_records] if max_records else records, cfg, reader=reader)
    if expand is not None:
        good = [r for rec in good for r in expand(rec)]
        if not good:
            raise ValueError(f"{what} has no samples for this task")
    log.info("%s: %d samples from %d usable records", what, len(good), report.records_out)
    return PretrainDataset(good, cfg, image_size, patch_size, train, validate=False, report=report)


def _is_shards(path: str, format: str) -> bool:
    if format == "auto" and not str(path).endswith(".json"):
        format = detect_format(path)
    return format == "wds"

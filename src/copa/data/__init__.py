"""COPA data layer: records, readers, synthetic scenes, transforms, patch labels, datasets, collate.

Names are imported lazily so that ``import copa.data.cli`` (done by every ``copa`` command) does not
pull in ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Record": "records",
    "Obj": "records",
    "QA": "records",
    "Ref": "records",
    "read_records": "readers",
    "read_json": "readers",
    "read_coco": "readers",
    "read_vg": "readers",
    "detect_format": "readers",
    "write_shards": "shards",
    "iter_shards": "shards",
    "ShardDataset": "shards",
    "expand_shards": "shards",
    "write_synth": "synth",
    "ImageBoxTransform": "transforms",
    "swap_left_right": "transforms",
    "box_to_patch_labels": "patch_labels",
    "DataReport": "badinput",
    "validate_records": "badinput",
    "ImageError": "image_io",
    "load_image": "image_io",
    "check_image": "image_io",
    "open_image": "image_io",
    "PretrainDataset": "dataset",
    "StreamingPretrainDataset": "dataset",
    "SampleBuilder": "dataset",
    "build_dataloader": "dataset",
    "build_dataset": "build",
    "make_dataset": "build",
    "Batch": "collate",
    "Collator": "collate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"copa.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'copa.data' has no attribute {name!r}")

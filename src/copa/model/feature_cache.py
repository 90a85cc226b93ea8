"""A content-addressed cache of what the frozen encoders compute from one input alone.

When the ViT is frozen (``train.freeze_vit``, the default of every fine-tune in the demo), its
text-independent outputs are a fixed function of the input pixels: the prefix (every block before
the first selection) always, and the whole encoder's tokens when no stage selects (keep 1.0, e.g.
grounding's unpruned fine-tune). A fine-tune sees each image many times — once per question or
referring expression, and again every epoch in each of its few augmentations (resize + flip) — so
it recomputes the same tensors over and over. Likewise a frozen text encoder's states are a fixed
function of a padded token row, and questions and referring expressions repeat across images. This
cache keys them by a hash of the input tensor's bytes (and the autocast dtype), so a hit returns
what the encoder computes for that input — to float rounding: a row computed within another batch
can differ in the last bit — and the training is the same, only cheaper
(``tests/test_feature_cache.py`` checks the losses, gradients and saved weights agree). Nothing about the
data pipeline needs to know: any augmentation that reproduces a view's pixels hits, one that never
repeats (a random crop) simply misses.

Under evaluation the cache may outlive one model: ``COPAModel.evaluation_cache`` scopes every key by
a fingerprint of the weights that computed it (``weights_fingerprint``), so one process's evaluations
of models that share a frozen trunk or text encoder (the demo runs ~40 of them) compute each image's
prefix and each text's states once, and a model with other weights never reads their entries.

Entries live on the device of the features; ``max_bytes`` caps the total, after which new views are
computed and not stored (counted as ``skipped``). Hashing needs the images on the host: on a GPU the
copy costs more than it saves at small sizes, and the cache is meant for CPU-bound fine-tunes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    skipped: int = 0  # misses not stored: the cache was full
    entries: int = 0
    bytes: int = 0

    def since(self, earlier: CacheStats) -> CacheStats:
        """What happened after ``earlier`` (a copy of these stats): lookups counted since, size now."""
        hits, misses = self.hits - earlier.hits, self.misses - earlier.misses
        return CacheStats(hits, misses, self.skipped - earlier.skipped, self.entries, self.bytes)

    def as_dict(self) -> dict[str, float]:
        looked = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "skipped": self.skipped,
            "entries": self.entries,
            "mb": round(self.bytes / 2**20, 1),
            "hit_rate": round(self.hits / looked, 4) if looked else 0.0,
        }


def row_keys(rows: Tensor, tag: str) -> list[bytes]:
    """One key per row of ``rows`` (B, ...) (an image, a padded token row): ``tag``, the row's shape
    and dtype, and a 128-bit hash of its bytes."""
    flat = rows.detach().to("cpu").contiguous().reshape(rows.shape[0], -1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else flat.numpy()
    head = f"{tag}|{tuple(rows.shape[1:])}|{rows.dtype}|".encode()
    return [head + hashlib.blake2b(row, digest_size=16).digest() for row in raw]


def weights_fingerprint(module: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A 128-bit hash of every parameter and buffer of ``module`` (name, shape, dtype and bytes) whose
    name does not start with one of ``skip``: modules with the same fingerprint compute the same
    function of the same input. ~0.1 s for a 22M-parameter text encoder on a CPU."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        if name.startswith(skip):
            continue
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return h.hexdigest()


class FrozenFeatureCache:
    """``lookup(kind, inputs, compute)`` -> ``compute(inputs)``, computed only for the rows not seen
    before under ``kind`` (module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.store: dict[bytes, Tensor] = {}
        self.stats = CacheStats()
        self._warned_full = False

    def lookup(self, kind: str, inputs: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """inputs (B, ...) -> compute's output (B, ...), the rows of inputs seen before under ``kind``
        taken from the store."""
        device = inputs.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        keys = row_keys(inputs, f"{kind}|{dtype}")
        rows: dict[bytes, int] = {}  # each unseen row once, even when a batch holds it twice
        for i, k in enumerate(keys):
            if k not in self.store and k not in rows:
                rows[k] = i
        self.stats.hits += len(keys) - len(rows)
        self.stats.misses += len(rows)
        fresh: dict[bytes, Tensor] = {}
        if rows:
            with torch.no_grad():
                computed = compute(inputs[list(rows.values())] if len(rows) < len(keys) else inputs)
            for j, k in enumerate(rows):
                fresh[k] = computed[j]
                self._store(k, computed[j])
        return torch.stack([fresh[k] if k in fresh else self.store[k] for k in keys])

    def _store(self, key: bytes, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.stats.bytes + size > self.max_bytes:
            self.stats.skipped += 1
            if not self._warned_full:
                log.warning(
                    "frozen-feature cache full at %.0f MB: further inputs are computed, not stored",
                    self.max_bytes / 2**20,
                )
                self._warned_full = True
            return
        self.store[key] = value.detach().clone()  # not a view into the batch's tensor
        self.stats.entries += 1
        self.stats.bytes += size

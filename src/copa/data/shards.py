"""Webdataset tar shards: write them from any reader, read them back as ``Record``s, stream them.

A sample is ``{key}.{jpg|png|...}`` (the original encoded bytes, never re-encoded) plus
``{key}.json`` (``Record.to_dict`` with ``image`` set to the image's member name). Keys are the
running index, zero-padded, so they contain no dot (webdataset splits a member name at its first
dot).

Streaming splits whole shards over (rank, DataLoader worker) pairs: consumer
``c = rank * num_workers + worker`` reads shards ``c, c + R·W, c + 2·R·W, ...``. Every sample is
read exactly once per epoch; with fewer shards than consumers some consumers read nothing (a
warning says so), so write at least ``world_size × num_workers`` shards.

Bad input in shards is counted in a ``DataReport``: a sample without ``.json`` or with one that is
not a record (``malformed_record``), without an image member (``missing_file``), a shard that
cannot be read (``unreadable_shard``) or that ends before the end-of-archive blocks every complete
tar ends with (``truncated_shard``: the records after the cut are lost and cannot be counted).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from copa.data.badinput import DataReport
from copa.data.records import Record
from copa.errors import DataFileNotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def expand_shards(spec: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """A directory (its ``*.tar``), a brace pattern ``a-{000..009}.tar``, a glob, or a list."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        return [u for s in spec for u in expand_shards(s)]
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else RANK/WORLD_SIZE env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def split_shards(urls: Sequence[str], rank: int, world: int, worker: int, num_workers: int) -> list[str]:
    """The shards of one (rank, worker) consumer; see the module docstring."""
    return list(urls[rank * num_workers + worker :: world * num_workers])


def sample_to_record(sample: dict[str, Any], drops: Counter[str] | None = None) -> Record:
    """A webdataset sample dict (``__key__``, ``json``, an image extension) → ``Record`` with ``data``.

    Raises ``ValueError`` or ``TypeError`` for a sample that is not a record (no or broken
    ``.json``); ``drops`` as in ``Record.from_dict``.
    """
    if "json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .json member")
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"sample {sample.get('__key__')}: .json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise TypeError(f"sample {sample.get('__key__')}: .json is not an object")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    meta.setdefault("image", f"{sample['__key__']}.{ext}")
    rec = Record.from_dict(meta, drops)
    rec.image = f"{sample.get('__url__', '')}::{rec.image}"
    rec.data = sample[ext] if ext else None
    if rec.image_id == "":
        rec.image_id = sample["__key__"]
    return rec


def tar_is_truncated(url: str) -> bool:
    """Whether a local tar file lacks the 1024 zero bytes every complete tar ends with (the
    end-of-archive blocks; Python's tarfile stops at a cut without an error)."""
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return False
    size = os.path.getsize(url)
    if size < 1024 or size % 512:
        return True
    with open(url, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def iter_shards(
    urls: str | os.PathLike[str] | Sequence[str], report: DataReport | None = None
) -> Iterator[Record]:
    """Every record of the given shards, in order (no splitting).

    ``report`` counts the samples read (``records_in``) and what was left out (module docstring);
    ``records_out`` is left to the caller, which may drop more.
    """
    report = report if report is not None else DataReport()
    for url in expand_shards(urls):
        errors: list[Exception] = []

        def handler(exn: Exception, errors: list[Exception] = errors) -> bool:
            log.warning("webdataset: skipping unreadable data: %r", exn)
            errors.append(exn)
            return True

        read = 0
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
            read += 1
            report.records_in += 1
            if not any(e in sample for e in IMAGE_EXTS):
                log.warning("shard %s: sample %s has no image member: skipped", url, sample.get("__key__"))
                report.add("missing_file")
                continue
            try:
                rec = sample_to_record(sample, report.counts)
            except (ValueError, TypeError, KeyError) as e:
                log.warning("shard %s: skipped: %s", url, e)
                report.add("malformed_record")
                continue
            yield rec
        if errors and not read:
            report.add("unreadable_shard")  # missing, not a tar, or cut inside its first sample
        elif tar_is_truncated(url):
            log.warning("shard %s is truncated: the records after the cut are lost", url)
            report.add("truncated_shard")
        elif errors:
            report.add("unreadable_shard")


def _image_member(rec: Record) -> tuple[bytes, str]:
    if rec.data is not None:
        data = rec.data
    else:
        with open(rec.image, "rb") as f:
            data = f.read()
    ext = Path(rec.image.split("::")[-1]).suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return data, ext if ext in IMAGE_EXTS else "img"


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    report: DataReport | None = None,
) -> list[str]:
    """Write records (with their image files' bytes) as ``{out_dir}/{prefix}-NNNNNN.tar``.

    Records whose image cannot be read are skipped and counted as ``missing_file`` in ``report``.
    Returns the shard paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    written = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i, rec in enumerate(records):
            try:
                data, ext = _image_member(rec)
            except OSError as e:
                log.warning("shard: skipping %s: %s", rec.image, e)
                if report is not None:
                    report.add("missing_file")
                continue
            key = f"{i:09d}"
            meta = rec.to_dict()
            meta["image"] = f"{key}.{ext}"
            meta["source"] = rec.image
            if meta["image_id"] == "":
                meta["image_id"] = i
            sink.write({"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            written += 1
    paths = sorted(glob.glob(str(out / f"{prefix}-*.tar")))
    log.info("wrote %d records into %d shards under %s", written, len(paths), out)
    return paths


def stable_id(key: str | int) -> int:
    """A non-negative int id for a string key, the same in every process (Python's hash is not)."""
    if isinstance(key, int):
        return key
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits a signed int64 tensor


class ShardDataset(IterableDataset):
    """Stream records from shards, split by rank and DataLoader worker without duplicates.

    Args:
        urls: shard spec (see ``expand_shards``).
        transform: applied to each record (e.g. a sample builder); ``None`` yields records.
        shuffle_shards: reshuffle the shard order every epoch (``set_epoch``), identically on every
            rank, before splitting.
        seed: base seed of that shuffle.
        rank, world_size: override ``dist_info()`` (tests, or custom launchers).
    """

    def __init__(
        self,
        urls: str | os.PathLike[str] | Sequence[str],
        transform: Callable[[Record], Any] | None = None,
        shuffle_shards: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(urls)
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        if not self.urls or (len(local) == len(self.urls) and not any(os.path.isfile(u) for u in local)):
            raise DataFileNotFoundError(f"no shards found for {urls!r}")
        self.transform = transform
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        rank, world = dist_info()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = list(self.urls)
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(urls))
            urls = [urls[i] for i in order]
        if len(urls) < world * nw and wid == 0:
            log.warning(
                "%d shards for %d consumers (ranks × workers): some read nothing", len(urls), world * nw
            )
        return split_shards(urls, rank, world, wid, nw)

    def records(self, report: DataReport | None = None) -> Iterator[Record]:
        """This consumer's records for the current epoch; ``report`` as in ``iter_shards``."""
        return iter_shards(self.my_shards(), report)

    def __iter__(self) -> Iterator[Any]:
        for rec in self.records():
            yield self.transform(rec) if self.transform is not None else rec

"""Where a saved model is: a local directory (the default, never touches the network) or a model-hub
id such as ``org/name`` resolved through ``huggingface_hub``.

A hub id is looked up in the local hub cache first (``HF_HUB_CACHE`` / ``~/.cache/huggingface/hub``
or ``cache_dir``); it is downloaded only when it is not cached, downloads are allowed
(``allow_download``; by default unless ``HF_HUB_OFFLINE`` is set) and the hub is reachable. Only the
files a COPA model consists of are fetched: ``config.json``, ``model.safetensors`` and the tokenizer.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from copa.errors import CheckpointNotFoundError

log = logging.getLogger(__name__)

MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and ".." not in name


def _offline_by_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(
    name_or_path: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    allow_download: bool | None = None,
) -> Path:
    """A local COPA model directory for ``name_or_path``.

    Local paths win: a model directory, or a training run directory with ``model/`` inside. A hub
    id is resolved through ``huggingface_hub.snapshot_download`` (cache first, see the module doc).

    Raises:
        CheckpointNotFoundError: neither a local path nor a hub id that can be found.
    """
    path = Path(name_or_path)
    if path.exists():
        if not (path / "model.safetensors").exists() and (path / "model" / "model.safetensors").exists():
            return path / "model"
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointNotFoundError(f"{name} is not a COPA checkpoint directory (no such path)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointNotFoundError(
            f"{name}: no such directory, and huggingface_hub is not installed"
        ) from None
    download = (not _offline_by_env()) if allow_download is None else allow_download
    kw = {
        "revision": revision,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "allow_patterns": MODEL_FILES,
    }
    try:
        local = snapshot_download(name, local_files_only=True, **kw)
        log.info("%s: from the local hub cache %s", name, local)
    except (LocalEntryNotFoundError, FileNotFoundError):
        if not download:
            raise CheckpointNotFoundError(
                f"{name}: no such directory, and not in the local hub cache (downloads are off: "
                "HF_HUB_OFFLINE is set)"
            ) from None
        try:
            local = snapshot_download(name, **kw)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise CheckpointNotFoundError(
                f"{name}: no such directory, and the hub has no such model ({first})"
            ) from None
        log.info("%s: downloaded to %s", name, local)
    return Path(local)

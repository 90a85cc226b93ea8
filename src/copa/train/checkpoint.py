"""Atomic training checkpoints that resume exactly.

Layout: ``OUT/checkpoints/step_000100/`` holds the model (``save_pretrained``: safetensors +
config), ``trainer.pt`` (optimizer, scheduler, RNG states, data position; loaded with
``weights_only=True``, so no arbitrary pickle), and ``OUT/checkpoints/latest`` names the newest
complete one. A checkpoint directory is written under a temporary name and renamed when complete,
and ``latest`` is replaced atomically, so a run killed at any moment leaves the last good one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_tensor(state: tuple) -> list:
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    keep: int = 2,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out/checkpoints/step_N`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, extra={"step": step, **(extra or {})}, state_dict=state_dict)
    torch.save(trainer_state, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / f".latest.{os.getpid()}"
    latest_tmp.write_text(final.name)
    latest_tmp.replace(root / "latest")
    old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    log.info("checkpoint: %s", final)
    return final


def clean_stale(out: Path) -> list[Path]:
    """Remove what a run killed while saving leaves in ``out/checkpoints``: ``.tmp_*`` directories
    (an incomplete checkpoint, never pointed at) and ``.latest.*`` markers. Call it before the run
    writes a checkpoint of its own (one writer per run directory). Returns what was removed."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    stale = sorted([*root.glob(".tmp_*"), *root.glob(".latest.*")])
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d incomplete checkpoint leftovers in %s", len(stale), root)
    return stale


def latest_checkpoint(out: Path) -> Path | None:
    marker = out / "checkpoints" / "latest"
    if not marker.exists():
        return None
    path = out / "checkpoints" / marker.read_text().strip()
    return path if path.is_dir() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def check_fork(src: Path, dst: Path) -> Path:
    """The checkpoint ``fork_run(src, dst)`` would copy; raises if there is none or ``dst`` has one
    (cheap, so every process of a distributed run can check before one of them copies)."""
    ckpt = latest_checkpoint(Path(src))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint to branch from in {src} (expected {src}/checkpoints/latest)")
    if latest_checkpoint(Path(dst)) is not None:
        raise FileExistsError(f"{dst} already has checkpoints; branch into a new directory (or --resume it)")
    return ckpt


def fork_run(src: Path, dst: Path) -> Path:
    """Start run directory ``dst`` as a branch of run ``src``: copy src's latest checkpoint (model,
    optimizer, scheduler, RNG, data position) and its CSV logs, so ``pretrain(..., resume=True)``
    on ``dst`` continues exactly where ``src`` stopped, typically with different settings (an
    ablation that shares the first steps). Refuses to overwrite a run that already has checkpoints.
    """
    ckpt = check_fork(src, dst)
    src, dst = Path(src), Path(dst)
    root = dst / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{ckpt.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    tmp.rename(root / ckpt.name)
    for name in ("train_log.csv", "val_log.csv"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    marker = root / f".latest.{os.getpid()}"
    marker.write_text(ckpt.name)
    marker.replace(root / "latest")
    log.info("branched %s from %s", dst, ckpt)
    return root / ckpt.name

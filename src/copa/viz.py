"""Pictures for reports: kept patches per text, loss curves, accuracy/speed vs keep ratio.

Matplotlib runs headless (Agg); every function writes one PNG and returns its path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image


def _overlay(img: np.ndarray, kept: Sequence[int], grid: int) -> np.ndarray:
    """Dim the dropped patches of img (H, W, 3) uint8; kept: patch indices in row-major order."""
    h, w = img.shape[:2]
    ph, pw = h // grid, w // grid
    mask = np.zeros((grid, grid), dtype=bool)
    for i in kept:
        mask[i // grid, i % grid] = True
    big = np.kron(mask, np.ones((ph, pw), dtype=bool))
    out = img.astype(np.float32)
    out[~big] = out[~big] * 0.25 + 40
    return out.clip(0, 255).astype(np.uint8)


def overlay_kept(img: np.ndarray, kept: Sequence[int], grid: int) -> np.ndarray:
    """img (H, W, 3) uint8 with H, W multiples of ``grid`` -> the same with the patches not in
    ``kept`` (row-major indices) dimmed."""
    return _overlay(img, kept, grid)


def kept_patches_figure(
    path: Path, rows: list[tuple[str, list[tuple[str, Sequence[int]]]]], grid: int, image_size: int
) -> Path:
    """One row per image: the image, then the kept patches for each (text, kept indices).

    rows: [(image_path, [(text, kept), ...]), ...]
    """
    ncols = 1 + max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.0 * ncols, 3.2 * len(rows)), squeeze=False)
    for r, (image_path, views) in enumerate(rows):
        img = np.asarray(Image.open(image_path).convert("RGB").resize((image_size, image_size)))
        axes[r][0].imshow(img)
        axes[r][0].set_title("image", fontsize=9)
        for c, (text, kept) in enumerate(views, start=1):
            axes[r][c].imshow(_overlay(img, kept, grid))
            axes[r][c].set_title(_wrap(text, 32), fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:3])


def loss_curves(path: Path, train_csv: Path, val_csv: Path | None = None) -> Path:
    """Training losses per step (and validation PTA recall when a val log exists)."""
    rows = list(csv.DictReader(train_csv.open()))
    keys = [k for k in ("itc", "itm", "mlm", "prefix_lm", "pta") if rows and k in rows[0]]
    steps = [int(r["step"]) for r in rows]
    n = 2 if val_csv is not None and val_csv.exists() else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for k in keys:
        vals = [float(r[k]) for r in rows]
        if any(v != 0 for v in vals):
            axes[0][0].plot(steps, vals, label=k)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].set_yscale("log")
    axes[0][0].legend()
    axes[0][0].set_title("pre-training losses")
    if n == 2:
        vrows = list(csv.DictReader(val_csv.open()))
        vs = [int(r["step"]) for r in vrows]
        for k, label in (
            ("pta_recall_phrase", "recall (phrase query)"),
            ("pta_recall_agnostic", "recall (text-agnostic)"),
            ("pta_ap_phrase", "AP (phrase)"),
        ):
            if vrows and k in vrows[0]:
                axes[0][1].plot(vs, [float(r[k]) for r in vrows], marker="o", label=label)
        if vrows and "pta_recall_random" in vrows[0]:
            axes[0][1].axhline(
                float(vrows[0]["pta_recall_random"]), color="gray", ls="--", label="random selection"
            )
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylim(0, 1)
        axes[0][1].legend()
        axes[0][1].set_title("PTA on validation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def xy_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Generic line plot: series name -> (xs, ys)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        pts = [
            (x, y)
            for x, y in zip(xs, ys, strict=True)
            if y is not None and not (isinstance(y, float) and math.isnan(y))
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""Evaluation helpers shared by the demo and the CLI: PTA quality on a split, selector swaps,
kept patches for chosen texts."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from copa.config import Config
from copa.model.copa import COPAModel

log = logging.getLogger(__name__)


# The selector ablation at equal visual-token count: the selectors without weights of their own,
# swapped into COPA's weights by ``with_selector`` (``none`` = unpruned). PTA quality is measured for
# all of them; the task rows (VQA, grounding, retrieval) for the pruned ones.
ABLATION_SELECTORS = ("none", "random", "tome", "cls_attn", "text_attn")
TASK_ABLATION_SELECTORS = tuple(s for s in ABLATION_SELECTORS if s != "none")


def with_selector(model: COPAModel, selector: str) -> COPAModel:
    """A view of ``model`` sharing all weights but using another selector (parameter-free ones:
    ``random``, ``tome``, ``cls_attn``, ``text_attn``, or ``none``); ``tpd`` returns the model itself.
    Used for ablations at the same keep ratio (``ABLATION_SELECTORS``)."""
    if selector == "tpd":
        return model
    return model.with_selectors(model.new_selectors(selector))


def with_selectors_of(model: COPAModel, donor: COPAModel) -> COPAModel:
    """A view of ``model`` sharing all its weights but selecting with ``donor``'s selectors (same
    selector type and shapes, e.g. another pre-training row of the same trunk): a fine-tuned model
    evaluated with another row's selection, no fine-tune of its own. The keep ratios are the
    evaluation's, not the selectors': a head fine-tuned unpruned takes a pruned row's selectors."""
    mine, theirs = (replace(m.cfg.select, keep_ratios=[]) for m in (model, donor))
    if mine != theirs:
        raise ValueError(f"selection configs differ: {model.cfg.select} vs {donor.cfg.select}")
    return model.with_selectors(donor.selectors_copy())


def eval_loader(cfg: Config, split: str, max_images: int | None = None, batch_size: int = 32) -> Any:
    """Evaluation batches of ``cfg.data.<split>`` (its first ``max_images`` records), built, cleaned
    and limited as every other dataset is (``copa.data.build.build_dataset``)."""
    from copa.data.build import build_dataset
    from copa.data.collate import Collator

    v = cfg.model.vision
    ds = build_dataset(
        cfg.data, split, v.image_size, v.patch_size, train=False, max_records=max_images, stream=False
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(cfg.model.text.tokenizer, cfg.model.text.max_len),
    )


@torch.no_grad()
def pta_eval(
    model: COPAModel, cfg: Config, split: str, keep_ratio: float, max_images: int | None = None
) -> dict[str, float]:
    """Object-patch recall and AP of the first-stage selector on ``split`` at ``keep_ratio``.

    With no selector (the unpruned model) every patch is kept: recall 1.0 at keep ratio 1.0.
    """
    from copa.train.pta_metrics import PTAMeter
    from copa.train.trainer import pta_batch

    if not model.has_selectors:
        return {"recall_phrase": 1.0, "recall_agnostic": 1.0, "keep_ratio": 1.0}
    model.eval()
    meter = PTAMeter(keep_ratio)
    for batch in eval_loader(cfg, split, max_images):
        pta_batch(model, batch, meter)
    return meter.result()


@torch.no_grad()
def kept_for_texts(
    model: COPAModel, cfg: Config, split: str, n_images: int
) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """For the first ``n_images`` images with two or more objects: the kept patches for two object
    phrases and for the text-agnostic query. -> [(image path, [(text, kept indices), ...]), ...]"""
    from copa.data.image_io import ImageError, load_image
    from copa.data.readers import read_records

    model.eval()
    size = cfg.model.vision.image_size
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    rows = []
    for rec in read_records(getattr(cfg.data, split), cfg.data.format, cfg.data.image_root):
        phrases = list(dict.fromkeys(o.phrase for o in rec.objects))
        if len(phrases) < 2:
            continue
        try:
            image = load_image(rec, cfg.data).image
        except ImageError as e:  # a figure helper: an unusable image is simply not drawn
            log.debug("kept_for_texts: %s", e)
            continue
        img = np.asarray(image.resize((size, size)), dtype=np.float32) / 255.0
        x = ((torch.from_numpy(img).permute(2, 0, 1) - mean) / std).unsqueeze(0)
        prefix = model.image_prefix(x)
        texts = phrases[:2]
        tok = model.tokenizer(texts, padding=True, return_tensors="pt")
        q = model.text_query(model.text_states(tok.input_ids, tok.attention_mask), tok.attention_mask)
        views = []
        for i, t in enumerate(texts):
            kept = model.image_tokens(prefix, q[i : i + 1]).kept
            views.append((f'"{t}"', [] if kept is None else kept[0].tolist()))
        kept = model.image_tokens(prefix).kept
        views.append(("text-agnostic query", [] if kept is None else kept[0].tolist()))
        rows.append((rec.image, views))
        if len(rows) >= n_images:
            break
    return rows

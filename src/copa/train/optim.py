"""The one optimizer and schedule: parameter groups, AdamW (fused kernels where torch has them),
warm-up + cosine. Pre-training, fine-tuning, the selector stage, the training bench and the ITC
probe all build their optimizer here, so a change of recipe reaches every caller.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from copa.config import TrainConfig
from copa.model.copa import COPAModel

log = logging.getLogger(__name__)

BETAS = (0.9, 0.98)  # β2 0.98 as in BERT / CLIP pre-training: steadier with large, noisy batches
# the keys that select AdamW's kernel: they belong to this machine, not to a checkpoint's
_KERNEL_KEYS = ("fused", "foreach")


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict[str, Any]]:
    """Learning rates by group (``COPAModel.param_group``): the ViT backbone at ``lr_vit``, the
    pretrained text encoder at ``lr_text``, the selectors at ``lr_selector``, what starts from scratch
    (box head, ITM, the fusion's patch positions) at ``lr_head``, everything else (fusion, decoder) at
    ``lr``, which the three optional rates default to; no weight decay on biases, norms, embeddings
    and other 1-D parameters.

    The text encoder gets its own, lower rate because at the new modules' rate (3e-4) it loses its
    pretrained sentence structure within a few dozen steps: every caption maps to nearly the same
    vector and ITC sits at chance (ln B) for ~100 steps; at 3e-5 ITC learns from the start (BENCHMARKS.md).
    """
    rates = {"vit": t.lr_vit, "text": t.lr, "selector": t.lr, "head": t.lr, "rest": t.lr}
    if t.lr_text is not None:
        rates["text"] = t.lr_text
    if t.lr_selector is not None:
        rates["selector"] = t.lr_selector
    if t.lr_head is not None:
        rates["head"] = t.lr_head
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        part = COPAModel.param_group(name)
        decay = p.ndim >= 2 and "embed" not in name and "token" not in name
        groups.setdefault((part, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": rates[part],
            "weight_decay": t.weight_decay if decay else 0.0,
            "base_lr": rates[part],
            "name": f"{part}{'' if decay else '_nodecay'}",
        }
        for (part, decay), ps in groups.items()
    ]


def lr_lambda(warmup: int, total: int, floor: float = 0.05) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup`` steps, then cosine down to ``floor``
    at ``total`` (``floor=1.0``: warm-up, then constant)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """The fastest AdamW implementation torch offers for these parameters' device: ``fused`` (one
    kernel for all tensors; measured 3.3x faster than the per-tensor loop for the optimizer step on
    CPU), else ``foreach``, else the per-tensor loop ({})."""
    from torch.optim.optimizer import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    kinds = {p.device.type for p in params}
    floating = all(torch.is_floating_point(p) for p in params)
    if floating and kinds <= set(_get_fused_kernels_supported_devices()):
        return {"fused": True}
    if kinds <= set(_get_foreach_kernels_supported_devices()):
        return {"foreach": True}
    return {}


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` take gradients (a stage that trains one part of ``model``);
    afterwards every parameter of ``model`` has its own ``requires_grad`` back, also on an error."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def adamw(
    groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter],
    betas: tuple[float, float] = BETAS,
    **kwargs: Any,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the fastest kernel that works here (see ``_kernel``); falls back to
    the per-tensor loop when torch refuses the kernel for these parameters."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    choice = _kernel(params)
    try:
        return torch.optim.AdamW(groups, betas=betas, **choice, **kwargs)
    except (RuntimeError, ValueError) as e:  # e.g. a dtype or tensor subclass the kernel does not take
        log.info("AdamW %s unavailable (%s): per-tensor implementation", choice, e)
        return torch.optim.AdamW(groups, betas=betas, **kwargs)


def build_optimizer(
    groups: Iterable[dict[str, Any]],
    steps: int,
    warmup: int,
    floor: float = 0.05,
    betas: tuple[float, float] = BETAS,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` (``param_groups`` or the caller's own) with warm-up + cosine over ``steps``.

    Build it after DDP/FSDP wrapping: FSDP replaces the parameters with sharded ones.
    """
    opt = adamw(groups, betas=betas)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps, floor))


def for_training(
    model: nn.Module,
    t: TrainConfig,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and schedule of ``copa pretrain`` and ``copa finetune`` for ``model``."""
    return build_optimizer(param_groups(model, t), t.steps, t.warmup)


def keep_kernel(opt: torch.optim.Optimizer, kernel: list[dict[str, Any]]) -> None:
    """Restore each group's kernel flags after ``load_state_dict`` (which copies the saved groups'
    flags): a checkpoint written with the fused kernel must resume on a machine without it, and the
    other way round. On the same machine the kernel is the same as before the cut, so the resume is
    exact."""
    for group, flags in zip(opt.param_groups, kernel, strict=True):
        group.update(flags)


def kernel_flags(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each group's kernel flags (``fused``, ``foreach``), to hand to ``keep_kernel`` after a load."""
    return [{k: g.get(k) for k in _KERNEL_KEYS} for g in opt.param_groups]

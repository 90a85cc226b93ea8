"""FLOPs of one call (``torch.utils.flop_counter``), with the CPU flash-attention kernels counted too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash SDPA (``aten._scaled_dot_product_flash_attention_for_cpu``), which
    ``torch.utils.flop_counter`` does not count: QK^T and PV, 2 FLOPs per MAC (causal not halved,
    like the counter's CUDA formulas)."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """Backward of the CPU flash SDPA: grad_q, grad_k, grad_v and the score gradient (4 matmuls),
    the counter's convention for the CUDA kernels."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * (2 * d + 2 * dv)


def _custom_flops() -> dict[Any, Callable[..., int]]:
    ops = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        out[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call of ``fn`` (matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        fn()
    return int(counter.get_total_flops())

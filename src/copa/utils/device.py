"""Device and precision helpers: bf16 autocast where the hardware runs it fast, fp32 otherwise."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles or AVX-512 BF16 (bf16 matmuls much faster than fp32)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch without the probes
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a bf16-capable GPU or CPU, else fp32; 'bf16' / 'fp32' as given."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def sync(device: torch.device) -> None:
    """Wait until the device has run everything queued (CUDA kernels are asynchronous); a no-op on the
    CPU. Every timer calls it before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

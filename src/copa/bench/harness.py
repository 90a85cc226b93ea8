"""What the inference and training runners share: the model with random weights, fixed inputs, the
switch between keep settings on one set of weights, and ``prepare`` (checks, switch, memory meter)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from copa.bench.keep import BenchError, KeepSetting
from copa.bench.memory import PeakMemory
from copa.config import Config, SelectConfig

if TYPE_CHECKING:
    from copa.model.copa import COPAModel
    from copa.model.vit import SelectionState

log = logging.getLogger(__name__)

CLS_ID, SEP_ID = 101, 102  # bert-base-uncased WordPiece ids; the text ids are random otherwise


class SelectionSwitch:
    """Switches one model between keep settings without touching its ViT/text/fusion weights.

    Each pruned setting gets its own selector modules (one per stage, a fixed seed per setting, the
    ViT's init; the setting's selector or else the config's); ``apply`` swaps them in with the
    selection layers and ratios (``COPAModel.swap_selection``). The unpruned setting has no selector,
    exactly the ``selector: none`` model.
    """

    def __init__(self, model: COPAModel, settings: list[KeepSetting], seed: int = 0) -> None:
        self.model = model
        self.base_select: SelectConfig = model.cfg.select
        self._saved: SelectionState | None = None
        self.selectors: dict[KeepSetting, nn.ModuleList] = {}
        depth = model.cfg.vision.layers
        for i, s in enumerate(settings):
            if not s.layers:
                self.selectors[s] = nn.ModuleList()
                continue
            if s.layers[-1] >= depth:
                raise BenchError(f"keep setting {s.name!r}: the ViT has only {depth} blocks")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1000 + i)
                mods = model.new_selectors(s.selector or self.base_select.selector, len(s.layers))
            if not len(mods):
                raise BenchError(
                    f"keep setting {s.name!r} needs a selector, but the config has selector "
                    f"{self.base_select.selector!r}; set model.select.selector=tpd (or another selector) "
                    f"or name one in the setting, e.g. 'tpd@{s.name}'"
                )
            self.selectors[s] = mods

    def to(self, dtype: torch.dtype) -> None:
        for mods in self.selectors.values():
            mods.to(dtype=dtype)

    def apply(self, s: KeepSetting) -> None:
        if s.layers:
            select = dataclasses.replace(
                self.base_select,
                layers=list(s.layers),
                keep_ratios=list(s.ratios),
                selector=s.selector or self.base_select.selector,
            )
        else:
            n = len(self.base_select.layers)
            select = dataclasses.replace(self.base_select, selector="none", keep_ratios=[1.0] * n)
        saved = self.model.swap_selection(self.selectors[s], select)
        if self._saved is None:  # the model's own, from before the first setting
            self._saved = saved

    def restore(self) -> None:
        """Put the model's own selection config and selectors back."""
        if self._saved is not None:
            self.model.restore_selection(self._saved)
            self._saved = None

    def parameters(self) -> Iterator[nn.Parameter]:
        for mods in self.selectors.values():
            yield from mods.parameters()


def build_bench_model(cfg: Config, image_size: int | None, device: torch.device, seed: int = 0) -> nn.Module:
    """The preset's model with random weights (no text checkpoint is loaded) at ``image_size``.

    The ViT is built for the benchmark's image size directly (its position table has that grid), so
    no interpolation runs inside the timed forward.
    """
    from copa.model.copa import COPAModel

    mcfg = dataclasses.replace(cfg.model, vision=dataclasses.replace(cfg.model.vision))
    if image_size:
        if image_size % mcfg.vision.patch_size:
            raise BenchError(
                f"image size {image_size} is not a multiple of the patch size {mcfg.vision.patch_size}"
            )
        mcfg.vision.image_size = image_size
    torch.manual_seed(seed)
    t = time.perf_counter()
    model = COPAModel(mcfg, load_text_weights=False).to(device).eval()
    log.info(
        "built %s model (%.1f M parameters, %d px) in %.1f s",
        cfg.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        mcfg.vision.image_size,
        time.perf_counter() - t,
    )
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(mode: str | None, warmup: int) -> None:
    """A ``torch.compile`` mode the benchmark knows, and a warm-up run to compile in."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise BenchError(f"unknown torch.compile mode {mode!r}; one of {', '.join(COMPILE_MODES)}")
    if warmup < 1:
        raise BenchError("torch.compile compiles in the first call of each setting: give --warmup >= 1")


@contextlib.contextmanager
def compiled(model: nn.Module, mode: str | None) -> Iterator[None]:
    """The model's blocks compiled (``COPAModel.compile_blocks``) for the block, eager again after."""
    if mode is None:
        yield
        return
    n = model.compile_blocks(mode=None if mode == "default" else mode)
    log.info("torch.compile (%s): %d blocks; the warm-up runs compile them", mode, n)
    try:
        yield
    finally:
        model.compile_blocks(False)


def make_inputs(
    model: nn.Module, batch: int, text_len: int, device: torch.device, seed: int = 0
) -> dict[str, Tensor]:
    """Fixed random images (B, 3, H, W) and question tokens ([CLS] w.. [SEP], all attended)."""
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    vocab = model.cfg.text.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID % vocab, SEP_ID % vocab
    return {"images": images.to(device), "ids": ids.to(device), "mask": torch.ones_like(ids).to(device)}


@dataclass
class Harness:
    """One benchmark's shared state: the model (one set of weights for every setting), the keep
    settings (unpruned first), the switch between them, the device and the memory meter."""

    model: nn.Module
    settings: list[KeepSetting]
    switch: SelectionSwitch
    device: torch.device
    memory: PeakMemory


def prepare(model: nn.Module, settings: list[KeepSetting], seed: int = 0) -> Harness:
    """The setup both runners start from; ``settings[0]`` must be the unpruned one (``parse_keeps``
    puts it there), since every speedup is measured against it."""
    if not settings or settings[0].layers:
        raise BenchError("the first setting must be the unpruned one ('none')")
    device = next(model.parameters()).device
    return Harness(model, settings, SelectionSwitch(model, settings, seed), device, PeakMemory(device))

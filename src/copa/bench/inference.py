"""Inference runner: throughput and FLOPs of the ViT alone and of the whole model per keep setting."""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from copa.bench.flops import count_flops
from copa.bench.hardware import dtype_name
from copa.bench.harness import SelectionSwitch, check_compile, compiled, make_inputs, prepare
from copa.bench.keep import BenchError, KeepSetting
from copa.bench.memory import NO_MEMORY, tensor_bytes
from copa.bench.timing import time_interleaved, timing_stats
from copa.utils.device import autocast

log = logging.getLogger(__name__)


def _vit_call(
    model: nn.Module, switch: SelectionSwitch, images: Tensor, query: Tensor, s: KeepSetting
) -> Callable[[], Any]:
    """The ViT alone under setting ``s``: images (B, 3, H, W), query (B, Dt) text [CLS]."""

    def f() -> Any:
        switch.apply(s)
        return model.image_tokens(model.image_prefix(images), query)

    return f


def _e2e_call(
    model: nn.Module,
    switch: SelectionSwitch,
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
    decode: bool,
    s: KeepSetting,
) -> Callable[[], Any]:
    """The whole VQA-style forward under setting ``s`` (text encoder, ViT with text-aware selection,
    fusion; with ``decode`` also the decoder's first step from [CLS] and its LM head)."""

    def f() -> Any:
        switch.apply(s)
        fused = model(images, ids, mask)
        if not decode:
            return fused
        ctx, cmask = fused.context()
        h = model.decode(ids[:, :1], None, ctx, cmask, model.new_decoder_cache(), 0)
        return model.lm_logits(h[:, -1])

    return f


def bench_inference(
    model: nn.Module,
    settings: list[KeepSetting],
    *,
    batch: int = 8,
    text_len: int = 16,
    runs: int = 5,
    warmup: int = 2,
    precisions: list[torch.dtype] | None = None,
    bf16_mode: str = "cast",
    decode: bool = False,
    peaks: dict[str, float] | None = None,
    seed: int = 0,
    min_util: float = 0.0,
    memory: bool = True,
    compile_mode: str | None = None,
) -> list[dict[str, Any]]:
    """Throughput and FLOPs of the ViT alone and of the whole model for every keep setting.

    ``settings[0]`` must be the unpruned setting (``parse_keeps`` puts it there). ``bf16_mode``:
    ``cast`` runs the model with bf16 weights (ToMe / timm ``--model-dtype``), ``autocast`` keeps
    fp32 weights under ``torch.autocast`` (re-casts the weights every forward). ``peaks`` maps a
    precision name to the measured matmul FLOP/s. Returns one record per (precision, setting);
    ``flops`` is per image-text pair, ``flops_vit`` per image. The model comes back in fp32 with its
    own selectors (after a bf16 ``cast`` run its weights are bf16-rounded: fine for timing).
    ``compile_mode`` (a ``torch.compile`` mode, "default" for the default one): the timed runs use
    ``COPAModel.compile_blocks``; FLOPs and memory are counted eagerly, the warm-up runs compile.
    """
    if bf16_mode not in ("cast", "autocast"):
        raise BenchError(f"bf16 mode must be cast or autocast, got {bf16_mode!r}")
    check_compile(compile_mode, warmup)
    h = prepare(model, settings, seed)
    device, switch, mem = h.device, h.switch, h.memory
    precisions = precisions or [torch.float32]
    inputs = make_inputs(model, batch, text_len, device, seed)
    model.eval()
    records: list[dict[str, Any]] = []
    flops: dict[KeepSetting, tuple[int, int]] = {}
    for dtype in precisions:
        pname = dtype_name(dtype)
        cast = dtype != torch.float32 and bf16_mode == "cast"
        model.to(torch.float32 if not cast else dtype)
        switch.to(torch.float32 if not cast else dtype)
        use_amp = dtype != torch.float32 and not cast
        images = inputs["images"].to(dtype) if cast else inputs["images"]
        ids, mask = inputs["ids"], inputs["mask"]
        amp = autocast(device, dtype) if use_amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            query = model.text_states(ids, mask)[:, 0]  # the ViT-alone runs take a fixed text [CLS]

            vit_fn = functools.partial(_vit_call, model, switch, images, query)
            e2e_fn = functools.partial(_e2e_call, model, switch, images, ids, mask, decode)

            tokens = {}
            for i, s in enumerate(settings):
                switch.apply(s)
                tokens[s] = int(model.image_tokens(model.image_prefix(images[:1]), query[:1]).tokens.shape[1])
                if s not in flops:  # FLOPs do not depend on the precision
                    log.info("%s: counting FLOPs of setting %s (%d/%d)", pname, s.name, i + 1, len(settings))
                    flops[s] = (count_flops(e2e_fn(s)), count_flops(vit_fn(s)))
            # peak memory of one e2e forward per setting
            if memory:
                log.info("%s: peak memory of %d settings", pname, len(settings))
            resident = tensor_bytes(model, *switch.selectors.values(), images, ids, mask, query)
            peak_mb = {s: mem.measure(e2e_fn(s), resident) if memory else NO_MEMORY for s in settings}
            log.info(
                "%s: timing %d settings x %d runs (+%d warm-up), batch %d, interleaved",
                pname,
                len(settings),
                runs,
                warmup,
                batch,
            )
            fns: dict[str, Callable[[], Any]] = {}
            for s in settings:
                fns[f"vit|{s.name}"] = vit_fn(s)
                fns[f"e2e|{s.name}"] = e2e_fn(s)
            with compiled(model, compile_mode):
                tm = time_interleaved(fns, warmup, runs, device, min_util)
        times = tm.seconds
        base_vit = statistics.median(times[f"vit|{settings[0].name}"])
        base_e2e = statistics.median(times[f"e2e|{settings[0].name}"])
        base_e2e_min = min(times[f"e2e|{settings[0].name}"])
        f0, fv0 = flops[settings[0]]
        peak = (peaks or {}).get(pname)
        for s in settings:
            tv = statistics.median(times[f"vit|{s.name}"])
            te = statistics.median(times[f"e2e|{s.name}"])
            f, fv = flops[s]
            ratio, ratio_vit = f0 / f, fv0 / fv
            sp_e2e, sp_vit = base_e2e / te, base_vit / tv
            achieved = f / te
            rec = {
                "precision": pname,
                "compile": compile_mode or "off",
                "keep": s.name,
                "selector": "none" if not s.layers else s.selector or switch.base_select.selector,
                "layers": list(s.layers),
                "ratios": list(s.ratios),
                "visual_tokens": tokens[s],
                "batch": batch,
                "flops": f // batch,
                "flops_vit": fv // batch,
                "flops_ratio": ratio,
                "flops_ratio_vit": ratio_vit,
                "images_per_s": batch / tv,
                "pairs_per_s": batch / te,
                "speedup_vit": sp_vit,
                "speedup_e2e": sp_e2e,
                "efficiency": sp_e2e / ratio,
                "efficiency_vit": sp_vit / ratio_vit,
                "achieved_flops_per_s": achieved,
                "achieved_flops_per_s_vit": fv / tv,
                "peak_share": achieved / peak if peak else None,
                "peak_share_vit": (fv / tv) / peak if peak else None,
                **peak_mb[s],
                "speedup_e2e_from_min": base_e2e_min / min(times[f"e2e|{s.name}"]),
                "time_e2e": timing_stats(times[f"e2e|{s.name}"], tm.util[f"e2e|{s.name}"]),
                "time_vit": timing_stats(times[f"vit|{s.name}"], tm.util[f"vit|{s.name}"]),
                "retried_calls": tm.retried,
                "waited_s": round(tm.waited_s, 1),
            }
            records.append(rec)
    switch.restore()
    model.to(torch.float32)
    return records

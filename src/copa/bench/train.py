"""Training runner: samples/s of one pre-training step, unpruned vs each keep setting."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from copa.bench.flops import count_flops
from copa.bench.hardware import dtype_name
from copa.bench.harness import CLS_ID, SEP_ID, check_compile, compiled, prepare
from copa.bench.keep import BenchError, KeepSetting
from copa.bench.memory import NO_MEMORY, tensor_bytes
from copa.bench.timing import time_interleaved, timing_stats
from copa.config import Config
from copa.utils.device import autocast

log = logging.getLogger(__name__)


def synthetic_batch(
    model: nn.Module, batch: int, text_len: int, seed: int = 0, boxed: int = 1, phrases: int = 2
) -> Any:
    """A fixed pre-training ``Batch``: random images and captions, ``boxed`` samples carrying
    ``phrases`` phrase boxes each (PTA runs), every image distinct (hard negatives exist)."""
    from copa.data.collate import Batch

    if batch < 2:
        raise BenchError("the training step needs a batch of at least 2 (ITM samples hard negatives)")
    g = torch.Generator().manual_seed(seed)
    size, n = model.cfg.vision.image_size, model.num_patches
    vocab = model.cfg.text.vocab_size
    lo = min(1000, vocab - 1)

    def texts(rows: int, length: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(lo, vocab, (rows, length), generator=g)
        ids[:, 0], ids[:, -1] = CLS_ID % vocab, SEP_ID % vocab
        return ids, torch.ones_like(ids)

    boxed = min(boxed, batch)
    cap_ids, cap_mask = texts(batch, text_len)
    p = boxed * phrases
    ph_ids, ph_mask = texts(p, max(4, text_len // 3))
    labels = (torch.rand(p, n, generator=g) < 0.15).float()
    has_boxes = torch.zeros(batch, dtype=torch.bool)
    has_boxes[:boxed] = True
    phrase_image = torch.arange(boxed).repeat_interleave(phrases)
    union = torch.zeros(batch, n)
    for i in range(p):
        union[phrase_image[i]] = torch.maximum(union[phrase_image[i]], labels[i])
    return Batch(
        images=torch.randn(batch, 3, size, size, generator=g),
        image_ids=torch.arange(batch),
        caption_ids=cap_ids,
        caption_mask=cap_mask,
        captions=[""] * batch,
        has_boxes=has_boxes,
        phrase_ids=ph_ids,
        phrase_mask=ph_mask,
        phrase_image=phrase_image,
        phrase_labels=labels,
        phrases=[""] * p,
        union_labels=union,
    )


def _batch_tensors(batch: Any) -> list[Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, Tensor)]


def _opt_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)]


def bench_train(
    model: nn.Module,
    cfg: Config,
    settings: list[KeepSetting],
    *,
    batch: int = 4,
    text_len: int = 16,
    runs: int = 3,
    warmup: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    min_util: float = 0.0,
    memory: bool = True,
    compile_mode: str | None = None,
) -> list[dict[str, Any]]:
    """Samples/s of one pre-training step (``PretrainObjective`` forward + backward + grad clipping
    + AdamW), unpruned (selector ``none``) vs each pruned setting; same weights, same batch, bf16
    autocast over fp32 weights as in ``copa pretrain``. Steps are interleaved across settings.
    The weights drift with the steps (speed does not depend on their values). ``compile_mode``: as
    in ``bench_inference`` (the forward and backward of the blocks compiled)."""
    check_compile(compile_mode, warmup)
    from copa.train.losses import PretrainObjective
    from copa.train.optim import adamw, param_groups

    h = prepare(model, settings, seed)
    device, switch, mem = h.device, h.switch, h.memory
    model.to(torch.float32).train()
    switch.to(torch.float32)
    t = cfg.train
    objective = PretrainObjective(model, t.loss_weights, t.mlm_prob, t.pta_pos_weight)
    data = synthetic_batch(model, batch, text_len, seed).to(device)
    switch.apply(settings[0])
    groups = param_groups(model, t)
    extra = [q for q in switch.parameters()]
    if extra:
        groups.append({"params": extra, "lr": t.lr, "weight_decay": t.weight_decay})
    opt = adamw(
        groups
    )  # the training kernel (fused where torch has it), so the step costs what it costs there
    amp = dtype != torch.float32

    def step_fn(s: KeepSetting) -> Callable[[], None]:
        def f() -> None:
            switch.apply(s)
            with autocast(device, dtype):  # a no-op in fp32
                res = objective(data)
            res.loss.backward()
            if t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return f

    # FLOPs of forward + backward (the optimizer step is not a matmul); this first step per setting
    # also allocates the AdamW state, which then counts as resident in the memory pass
    log.info("train: counting FLOPs of %d settings", len(settings))
    flops = {s: count_flops(step_fn(s)) for s in settings}
    peak_mb = {s: NO_MEMORY for s in settings}
    for s in settings if memory else []:
        resident = tensor_bytes(model, *switch.selectors.values(), *_batch_tensors(data), *_opt_tensors(opt))
        peak_mb[s] = mem.measure(step_fn(s), resident)
    log.info(
        "train: timing %d settings x %d steps (+%d warm-up), batch %d, interleaved",
        len(settings),
        runs,
        warmup,
        batch,
    )
    with compiled(model, compile_mode):
        tm = time_interleaved({s.name: step_fn(s) for s in settings}, warmup, runs, device, min_util)
    times = tm.seconds
    switch.restore()
    opt.zero_grad(set_to_none=True)
    model.eval()
    t0 = statistics.median(times[settings[0].name])
    f0 = flops[settings[0]]
    out = []
    for s in settings:
        ts = statistics.median(times[s.name])
        sp, ratio = t0 / ts, f0 / flops[s]
        out.append(
            {
                "precision": dtype_name(dtype) + ("-autocast" if amp else ""),
                "compile": compile_mode or "off",
                "keep": s.name,
                "selector": "none" if not s.layers else s.selector or switch.base_select.selector,
                "layers": list(s.layers),
                "ratios": list(s.ratios),
                "batch": batch,
                "flops": flops[s] // batch,
                "flops_ratio": ratio,
                "samples_per_s": batch / ts,
                "speedup": sp,
                "efficiency": sp / ratio,
                "achieved_flops_per_s": flops[s] / ts,
                **peak_mb[s],
                "time_step": timing_stats(times[s.name], tm.util[s.name]),
                "retried_calls": tm.retried,
                "waited_s": round(tm.waited_s, 1),
            }
        )
    return out

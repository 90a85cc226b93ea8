"""The one training loop of ``copa pretrain`` and ``copa finetune``, and the one DDP/FSDP ``wrap``.

A step: ``grad_accum`` forwards of the wrapped objective under autocast, a non-finite check that every
rank takes part in, backward, gradient clipping, the optimizer and schedule step, a CSV/TensorBoard
row, and a time budget that the ranks decide together. What differs between the callers stays with
them as hooks: pre-training validates, measures PTA and writes resumable checkpoints in
``after_step``; fine-tuning evaluates its task after the loop.

Read with ``copa.train.optim`` (the optimizer and schedule the loop steps).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from copa.config import TrainConfig
from copa.train import distributed as D
from copa.utils.device import autocast

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the run stops and keeps its last good checkpoint."""


# ------------------------------------------------------------------------------ wrapping
def shard_fsdp(objective: nn.Module) -> nn.Module:
    """FSDP2 in place on an objective that holds a ``COPAModel`` as ``.model``: one unit per
    transformer layer, the rest (embeddings, selectors, heads) in the objective's root unit.

    The attention selectors and token merging use a ViT block's query/key projections outside its
    forward (``ViTBlock.attention_scores``, ``attention_keys``); registering those methods makes FSDP
    gather the block's weights for them too (without it: "mixed torch.Tensor and DTensor").
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    m = objective.model
    for layer in m.transformer_layers():
        fully_shard(layer)
    for module, method in m.methods_outside_forward():
        register_fsdp_forward_method(module, method)
    fully_shard(objective)
    return objective


def wrap(objective: nn.Module, distributed: str, device: torch.device) -> nn.Module:
    """The objective as the ranks train it: itself in one process, FSDP2-sharded in place when
    ``distributed == "fsdp"``, else DDP. Build the optimizer after this (FSDP swaps the parameters)."""
    if D.world_size() == 1:
        return objective
    if distributed == "fsdp":
        return shard_fsdp(objective)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # pre-training leaves the box head unused, each task most heads: hence find_unused_parameters
    return DDP(
        objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def is_sharded(distributed: str) -> bool:
    """Whether ``wrap`` shards the parameters in this process group."""
    return D.world_size() > 1 and distributed == "fsdp"


def full_state(
    model: nn.Module, opt: torch.optim.Optimizer | None, fsdp: bool, everywhere: bool = False
) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
    """Full (unsharded) model and optimizer state. Without FSDP: (None, the optimizer's own state).

    Under FSDP this is collective (call on every rank); the tensors go to CPU and only rank 0 gets
    them, unless ``everywhere`` (every rank gets the full model, e.g. to evaluate it unsharded).
    """
    if not fsdp:
        return None, opt.state_dict() if opt is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    model_sd = get_model_state_dict(model, options=opts)
    return model_sd, get_optimizer_state_dict(model, opt, options=opts) if opt is not None else None


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool
) -> None:
    """Load a full optimizer state (as ``full_state`` returns it) into ``opt``, sharding it under FSDP;
    the kernel choice stays this machine's (``optim.keep_kernel``)."""
    from copa.train.optim import keep_kernel, kernel_flags

    kernel = kernel_flags(opt)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model,
            opt,
            state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
    else:
        opt.load_state_dict(state)
    keep_kernel(opt, kernel)


def all_finite(tensors: Any) -> bool:
    """Whether every floating-point tensor holds only finite values."""
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_floating_point(t))


# ------------------------------------------------------------------------------ logging
class RunLog:
    """CSV + TensorBoard on rank 0; no-op elsewhere."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.files: dict[str, tuple[Any, csv.DictWriter]] = {}
        self.out = out
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard not installed: CSV logs only")

    def write(self, name: str, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row}
        if name not in self.files:
            path = self.out / f"{name}.csv"
            append = path.exists()  # a resumed run continues its log
            f = path.open("a", newline="")
            w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if not append:
                w.writeheader()
            self.files[name] = (f, w)
        f, w = self.files[name]
        w.writerow(row)
        f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{name}/{k}", v, step)

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------ the loop
@dataclass
class Forward:
    """What the loop needs of one forward: the scalar to backpropagate, the named terms to check and
    log, and events to count (e.g. ``{"itm_skipped": 1}``)."""

    loss: Tensor  # () scalar
    terms: dict[str, Tensor]  # name -> () scalar
    events: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of(out: Any) -> Forward:
        """From ``PretrainObjective``'s ``StepOutput`` (``loss``, ``losses``, ``events``) or a task's
        ``{"loss": ..., term: ...}`` dict."""
        if isinstance(out, dict):
            return Forward(out["loss"], {k: v for k, v in out.items() if k != "loss"})
        return Forward(out.loss, out.losses, out.events)


@dataclass
class LoopResult:
    steps: int  # the step reached (counting the steps before a resume)
    stopped_early: bool  # by the time budget or ``stop_at``
    losses: list[float]  # mean loss of each step this call ran
    wall_s: float


@dataclass
class TrainLoop:
    """Step mechanics shared by pre-training and fine-tuning; see the module docstring.

    ``wrapped`` is the (DDP/FSDP-wrapped) objective, ``model`` the module whose parameters are
    clipped. Hooks: ``on_batch`` sees each batch before it moves to the device (bad-input events);
    ``after_step(step, final)`` runs after every update, ``final`` on the last step and on the step
    where the time budget ran out (validate, checkpoint); ``failure_note()`` ends the message of a
    non-finite stop (which checkpoint is kept).
    """

    wrapped: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[Any]
    device: torch.device
    dtype: torch.dtype
    steps: int
    grad_accum: int = 1
    clip_grad: float = 0.0
    log_every: int = 50
    time_budget_s: float = 0.0
    samples_per_step: int = 1  # per rank (batch size x accumulation), for samples/s
    where: str = "train"  # names the run in messages
    terms: tuple[str, ...] = ()  # columns always logged (0 when an objective leaves a term out)
    runlog: RunLog | None = None
    progress: bool = False  # a tqdm bar on rank 0 instead of a log line per logged step
    events: Counter[str] = field(default_factory=Counter)  # the objective's events, counted in place
    on_batch: Callable[[Any], None] | None = None
    after_step: Callable[[int, bool], None] | None = None
    failure_note: Callable[[], str] = lambda: ""

    @classmethod
    def from_config(
        cls,
        t: TrainConfig,
        wrapped: nn.Module,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        batches: Iterator[Any],
        device: torch.device,
        dtype: torch.dtype,
        **hooks: Any,
    ) -> TrainLoop:
        """The loop as ``train.*`` sets it (steps, accumulation, clipping, logging, time budget);
        ``hooks``: the remaining fields (``where``, ``runlog``, ``after_step``, ...)."""
        return cls(
            wrapped,
            model,
            opt,
            sched,
            batches,
            device,
            dtype,
            steps=t.steps,
            grad_accum=t.grad_accum,
            clip_grad=t.clip_grad,
            log_every=t.log_every,
            time_budget_s=t.time_budget_s,
            samples_per_step=t.batch_size * t.grad_accum,
            **hooks,
        )

    def _accumulate(self, step: int) -> tuple[float, dict[str, float]]:
        """Forward + backward of ``grad_accum`` batches: (mean loss, mean terms). Raises on a
        non-finite term on any rank; every rank takes part in the check, so all stop together."""
        loss, acc = 0.0, {k: 0.0 for k in self.terms}
        for _ in range(self.grad_accum):
            batch = next(self.batches)
            if self.on_batch is not None:
                self.on_batch(batch)
            batch = batch.to(self.device)
            with autocast(self.device, self.dtype):
                res = Forward.of(self.wrapped(batch))
            bad = [k for k, v in res.terms.items() if not torch.isfinite(v)]
            bad = bad or ([] if torch.isfinite(res.loss) else ["loss"])  # name the term when there is one
            if D.all_reduce_mean(torch.tensor(float(bool(bad)), device=self.device)) > 0:
                raise NonFiniteLossError(
                    f"non-finite loss at {self.where} step {step}: "
                    f"{bad or 'on another rank'}; stopping{self.failure_note()}"
                )
            self.events.update(res.events)
            (res.loss / self.grad_accum).backward()
            loss += float(res.loss.detach()) / self.grad_accum
            for k, v in res.terms.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach()) / self.grad_accum
        return loss, acc

    def _out_of_time(self, t0: float) -> bool:
        """Whether the time budget is spent, agreed by all ranks: rank clocks differ, and a rank that
        stopped alone would leave the others waiting in the next collective (validation's
        all-gather, the next non-finite check) until the process-group timeout."""
        if self.time_budget_s <= 0:
            return False
        late = torch.tensor(float(time.perf_counter() - t0 > self.time_budget_s), device=self.device)
        return bool(D.all_reduce_mean(late) > 0)

    def run(self, start: int = 0, stop_at: int | None = None) -> LoopResult:
        """Train from step ``start`` to ``steps``; ``stop_at`` ends this call after that step, as a
        preemption would (the caller resumes later from its checkpoint)."""
        bar = None
        if self.progress and D.is_main():
            from tqdm import tqdm

            bar = tqdm(total=self.steps, initial=start, desc=self.where, dynamic_ncols=True, mininterval=1.0)
        losses: list[float] = []
        t0 = time.perf_counter()
        window_t, window_n = t0, 0
        step, stopped = start, False
        try:
            while step < self.steps:
                loss, terms = self._accumulate(step + 1)
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
                    if self.clip_grad > 0
                    else torch.tensor(0.0)
                )
                if not math.isfinite(
                    float(grad_norm)
                ):  # ranks hold the same reduced gradients: all stop here
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at {self.where} step {step + 1}; "
                        f"stopping before the update{self.failure_note()}"
                    )
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss)
                window_n += self.samples_per_step * D.world_size()
                sps = window_n / max(1e-9, time.perf_counter() - window_t)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.3f}" for k, v in terms.items()} | {"sps": f"{sps:.1f}"}, refresh=False
                    )
                if step % self.log_every == 0 or step in (1, self.steps):
                    row = {
                        "loss": loss,
                        **terms,
                        "lr": self.sched.get_last_lr()[-1],
                        "grad_norm": float(grad_norm),
                        "samples_per_s": sps,
                        "elapsed_s": time.perf_counter() - t0,
                    }
                    if self.runlog is not None:
                        self.runlog.write("train_log", step, row)
                    if bar is None and D.is_main():
                        log.info(
                            "%s step %d/%d: %s",
                            self.where,
                            step,
                            self.steps,
                            {k: round(v, 4) for k, v in row.items() if k in terms or k == "loss"},
                        )
                    window_t, window_n = time.perf_counter(), 0
                budget_hit = self._out_of_time(t0)
                if self.after_step is not None:
                    self.after_step(step, step == self.steps or budget_hit)
                if stop_at is not None and stop_at <= step < self.steps:
                    log.warning("stopping at step %d as asked (--stop-at); continue with --resume", step)
                    stopped = True
                    break
                if budget_hit and step < self.steps:
                    log.warning(
                        "time budget of %.0f s reached at step %d of %d: stopping early",
                        self.time_budget_s,
                        step,
                        self.steps,
                    )
                    stopped = True
                    break
        finally:
            if bar is not None:
                bar.close()
        return LoopResult(step, stopped, losses, time.perf_counter() - t0)

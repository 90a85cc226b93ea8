"""Pre-training: data, validation with PTA quality metrics and checkpoints that resume exactly,
around the shared step loop (``copa.train.loop``: accumulation, clipping, bf16 autocast, DDP/FSDP,
CSV + TensorBoard logs, time budget) and optimizer (``copa.train.optim``: AdamW with a lower LR for
the ViT and the text encoder, warm-up + cosine).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from copa.config import Config, to_dict, with_preprocess
from copa.model.copa import COPAModel, load_weights, read_model_config
from copa.train import distributed as D
from copa.train.checkpoint import (
    check_fork,
    clean_stale,
    fork_run,
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from copa.train.loop import (
    NonFiniteLossError,
    RunLog,
    TrainLoop,
    all_finite,
    full_state,
    is_sharded,
    load_optimizer_state,
    shard_fsdp,
    wrap,
)
from copa.train.losses import LOSS_NAMES, PretrainObjective, pta_logits
from copa.train.optim import for_training, lr_lambda, param_groups
from copa.train.pta_metrics import PTAMeter
from copa.train.sampler import BoxedMixSampler, EpochSeeded, ResumableSampler, loader_generator
from copa.utils.device import autocast, resolve_precision

log = logging.getLogger(__name__)

# moved to copa.train.loop / copa.train.optim; still importable from here for existing callers
__all__ = [
    "NonFiniteLossError",
    "RunLog",
    "TrainResult",
    "build_datasets",
    "lr_lambda",
    "make_loader",
    "param_groups",
    "pretrain",
    "shard_fsdp",
    "validate",
]


# ------------------------------------------------------------------------------ data
def build_datasets(cfg: Config, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """In-memory, pre-scanned datasets for JSON / COCO / VG sources; a stream for webdataset shards."""
    from copa.data.build import build_dataset

    out = {}
    v, d = cfg.model.vision, cfg.data
    for split in splits:
        path = getattr(d, split)
        out[split] = build_dataset(d, split, v.image_size, v.patch_size)
        report = getattr(out[split], "report", None)
        log.info(
            "%s: %s from %s; bad input: %s",
            split,
            f"{len(out[split])} records" if report is not None else "streaming shards",
            path,
            report.summary() if report is not None else "counted per batch",
        )
    return out


class EndlessStream(torch.utils.data.IterableDataset):
    """Loops a streaming dataset over epochs forever, skipping the first ``start`` samples (resume)."""

    def __init__(self, base: Any, start: int = 0) -> None:
        self.base, self.start = base, start

    def __iter__(self):
        epoch, seen = 0, 0
        while True:
            self.base.set_epoch(epoch)
            produced = False
            for sample in self.base:
                produced = True
                seen += 1
                if seen > self.start:
                    yield sample
            if not produced:
                from copa.errors import DataSourceError

                raise DataSourceError("the shard stream produced no usable sample for this process")
            epoch += 1


def make_loader(
    dataset: Any,
    cfg: Config,
    train: bool,
    start: int = 0,
    batch_size: int | None = None,
    boxed_per_batch: int = 0,
) -> DataLoader:
    """Endless, deterministic and resumable batches (``start`` = samples this rank already consumed).

    Map-style data resumes exactly (per-sample RNG from epoch and index); a shard stream resumes at
    the same sample position, with augmentations drawn afresh.
    """
    from copa.data.collate import Collator

    collate = Collator(cfg.model.text.tokenizer, cfg.model.text.max_len)
    bs = batch_size or cfg.train.batch_size
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(
            EndlessStream(dataset, start),
            batch_size=bs,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            drop_last=True,
        )
    boxed = boxed_per_batch if train else 0
    pool = [i for i, r in enumerate(getattr(dataset, "records", [])) if r.objects] if boxed else []
    if boxed and pool:
        sampler: torch.utils.data.Sampler = BoxedMixSampler(
            len(dataset), pool, boxed, bs, cfg.seed, D.rank(), D.world_size(), start
        )
    else:
        if boxed:
            log.warning("train.boxed_per_batch=%d but no training record has boxes: plain shuffling", boxed)
        sampler = ResumableSampler(
            len(dataset), cfg.seed, D.rank(), D.world_size(), shuffle=train, start=start
        )
    return DataLoader(
        EpochSeeded(dataset, cfg.seed),
        batch_size=bs,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=loader_generator(cfg.seed),
        drop_last=True,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(
    objective: PretrainObjective,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype,
    max_batches: int = 8,
    events: Counter[str] | None = None,
) -> dict[str, float]:
    """Validation losses and PTA metrics (AP, object-patch recall at the first stage's keep ratio).

    Runs under a forked RNG so that validating never changes the training run's random stream.
    ``events`` collects the bad-input events of the batches read.
    """
    model = objective.model
    was_training = model.training
    model.eval()
    meter = PTAMeter(model.keep_ratios[0])
    sums: dict[str, float] = {}
    n: Counter[str] = Counter()
    skipped = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1234)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            if events is not None:
                events.update(batch.events)
            batch = batch.to(device)
            with autocast(device, dtype):
                out = objective(batch)
                skipped += out.events.get("itm_skipped", 0)
                for k, v in out.losses.items():
                    if k == "itm" and out.events.get("itm_skipped"):
                        continue  # a one-image batch has no ITM negatives: not in the ITM mean
                    sums[k] = sums.get(k, 0.0) + float(v)
                    n[k] += 1
                pta_batch(model, batch, meter)
    model.train(was_training)
    res = {f"val_{k}": v / max(1, n[k]) for k, v in sums.items()}
    res["val_itm_skipped"] = float(skipped)
    res.update({f"pta_{k}": v for k, v in meter.result().items()})
    return res


def pta_batch(model: COPAModel, batch: Any, meter: PTAMeter) -> None:
    """First-stage selector logits for each phrase and for the text-agnostic query vs. labels."""
    if not model.has_selectors:
        return
    out = pta_logits(model, model.image_prefix(batch.images), batch)
    if out.phrase is not None:
        meter.add("phrase", out.phrase, batch.phrase_labels, batch.phrase_image)
    if out.agnostic is not None:
        meter.add("agnostic", out.agnostic, batch.union_labels[out.boxed])


# ------------------------------------------------------------------------------ pre-training
@dataclass
class TrainResult:
    steps: int
    final: dict[str, float]
    out: Path


def _adopt_selection(model: COPAModel, cfg: Config) -> None:
    """--init: the checkpoint fixes the architecture except the selection, which is the config's
    (rebuilt in the ViT, so the saved model is the trained one); warn about the config keys ignored."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    ours, theirs = flat(to_dict(cfg.model)), flat(to_dict(model.cfg))
    ignored = sorted(
        k
        for k in ours
        if not k.startswith(("select.", "text.tokenizer", "text.pretrained")) and ours[k] != theirs.get(k)
    )
    if ignored:
        log.warning(
            "--init: the checkpoint's architecture is used; config values ignored: %s",
            {k: (ours[k], theirs.get(k)) for k in ignored},
        )
    model.set_selection(cfg.model.select)


def pretrain(
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    init: str | None = None,
    stop_at: int | None = None,
    branch_from: str | Path | None = None,
) -> TrainResult:
    """Pre-train ``cfg`` into ``out``. ``resume`` continues from the latest checkpoint there;
    ``stop_at`` ends this invocation after that step, as a preemption would (resume later);
    ``branch_from`` first copies another run's latest checkpoint into ``out`` and resumes from it
    under ``cfg`` (``fork_run``)."""
    out = Path(out)
    device = D.init_from_env()
    main = D.is_main()
    if branch_from is not None:
        check_fork(Path(branch_from), out)  # on every rank, so a bad path fails everywhere, not in a barrier
        D.barrier()
        if main:
            fork_run(Path(branch_from), out)
        D.barrier()
        resume = True
    if init:  # the data must be normalised as the checkpoint's model expects
        cfg = with_preprocess(cfg, read_model_config(init).preprocess)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        clean_stale(out)  # half-written checkpoints of a killed run
    datasets = build_datasets(cfg)  # before the model: a data mistake fails in seconds, not minutes
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = COPAModel.from_pretrained(init) if init else COPAModel(cfg.model)
    if init:
        _adopt_selection(model, cfg)
        model.set_keep_ratio(cfg.model.select.keep_ratios)
        model.set_output_vocab([])  # pre-training's text is open: a fine-tune's output vocabulary is not
    model.freeze(
        cfg.train.freeze_text_layers,
        cfg.train.freeze_vit,
        bool(cfg.train.freeze_selector),
        cfg.train.tune_vit_suffix,
    )
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device).train()
    dtype = resolve_precision(cfg.train.precision, device)
    t = cfg.train
    objective = PretrainObjective(
        model,
        t.loss_weights,
        t.mlm_prob,
        t.pta_pos_weight,
        t.pta_contrast,
        t.itm_negatives,
        pta_other_weight=t.pta_other_weight,
    )
    start_step = 0
    ckpt = latest_checkpoint(out) if resume else None
    state = None
    if ckpt is not None:  # weights go into the unwrapped model, before any sharding
        load_weights(model, ckpt / "model.safetensors", strict=True, device=str(device))
        state = load_trainer_state(ckpt)
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", out)
    fsdp = is_sharded(t.distributed)
    wrapped = wrap(objective, t.distributed, device)
    opt, sched = for_training(model, t)  # after wrapping: FSDP replaces parameters with sharded ones
    if state is not None:
        load_optimizer_state(model, opt, state["optimizer"], fsdp)
        sched.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        set_rng_state(state["rng"][D.rank()] if isinstance(state["rng"], list) else state["rng"])
        log.info("resumed from %s at step %d", ckpt, start_step)
    else:  # from here on each rank draws its own masks, cuts and negatives
        torch.manual_seed(cfg.seed * 1000 + D.rank() + 1)

    per_step = t.batch_size * t.grad_accum
    train_loader = make_loader(
        datasets["train"], cfg, train=True, start=start_step * per_step, boxed_per_batch=t.boxed_per_batch
    )
    val_bs = t.batch_size
    if hasattr(datasets["val"], "__len__"):
        val_bs = max(1, min(t.batch_size, len(datasets["val"]) // D.world_size()))
    val_loader = make_loader(datasets["val"], cfg, train=False, batch_size=val_bs)
    runlog = RunLog(out, main)
    # this rank's events so far: bad input met in batches (counted once: first epoch only) and
    # training events (ITM skipped for a one-image batch); a resumed run continues the counts
    counted = state.get("events", []) if state is not None else []
    mine = counted[D.rank()] if D.rank() < len(counted) else {}
    batch_events: Counter[str] = Counter(mine.get("train", {}))
    val_state: dict[str, Counter[str] | None] = {
        "events": Counter(mine.get("val", {})) if mine.get("val_counted") else None
    }
    step_events: Counter[str] = Counter(mine.get("steps", {}))
    last_val: dict[str, float] = {}

    def kept() -> str:
        return f", the last good checkpoint is kept ({latest_checkpoint(out)})"

    def after_step(step: int, final: bool) -> None:
        """Validation and checkpoints; ``final``: the last step, or the time budget ran out."""
        nonlocal last_val
        if step % t.val_every == 0 or final:
            # a val stream restarts at every validation: its events are counted at the first one
            first = val_state["events"] is None
            if first:
                val_state["events"] = Counter()
            last_val = validate(
                objective, val_loader, device, dtype, events=val_state["events"] if first else None
            )
            runlog.write("val_log", step, last_val)
            if main:
                log.info("step %d validation: %s", step, {k: round(v, 4) for k, v in last_val.items()})
        if step % t.ckpt_every == 0 or final:
            model_sd, opt_sd = full_state(model, opt, fsdp)
            # never write (and point `latest` at) a model that has diverged; every rank agrees
            finite = all_finite(model_sd.values() if model_sd is not None else model.parameters())
            if D.all_reduce_mean(torch.tensor(float(not finite), device=device)) > 0:
                raise NonFiniteLossError(f"non-finite parameters after step {step}; not saved{kept()}")
            rngs = D.gather_objects(rng_state())  # every rank's stream, for an exact resume
            events = D.gather_objects(_events_state(batch_events, val_state["events"], step_events))
            if main:
                ckpt_state = {
                    "optimizer": opt_sd,
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "rng": rngs,
                    "data_position": step * per_step,
                    "events": events,
                }
                save_checkpoint(
                    out,
                    step,
                    model,
                    ckpt_state,
                    extra={"provenance": provenance(cfg, step)},
                    state_dict=model_sd,
                )
            del model_sd, opt_sd
            D.barrier()

    loop = TrainLoop.from_config(
        t,
        wrapped,
        model,
        opt,
        sched,
        iter(train_loader),
        device,
        dtype,
        where="pretrain",
        terms=LOSS_NAMES,
        runlog=runlog,
        progress=True,
        events=step_events,
        on_batch=lambda batch: batch_events.update(batch.events),
        after_step=after_step,
        failure_note=kept,
    )
    try:
        res = loop.run(start_step, stop_at)
    finally:
        runlog.close()
    step, stopped_early = res.steps, res.stopped_early
    final_sd = full_state(model, None, fsdp)[0] if fsdp else None
    # DDP ranks must agree exactly; FSDP ranks hold shards, so its one checksum is of the full state
    checksums = (
        [param_checksum(final_sd.values())] if fsdp else D.gather_objects(param_checksum(model.parameters()))
    )
    every = D.gather_objects(_events_state(batch_events, val_state["events"], step_events))
    summary = {
        "steps": step,
        "param_checksums": checksums,
        "stopped_early": stopped_early,
        "wall_s": res.wall_s,
        "precision": str(dtype).replace("torch.", ""),
        "world_size": D.world_size(),
        "final_val": last_val,
        "data_report": _data_report(datasets, every),
        "events": dict(sum((Counter(e["steps"]) for e in every), Counter())),
        "parameters": model.num_parameters(),
    }
    if main:
        if not (stopped_early and stop_at is not None):  # a preempted run has only its checkpoint
            model.save_pretrained(
                out / "model", extra={"provenance": provenance(cfg, step)}, state_dict=final_sd
            )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "pta_metrics.json").write_text(
            json.dumps({k: v for k, v in last_val.items() if k.startswith("pta_")}, indent=2)
        )
    D.barrier()
    return TrainResult(step, last_val, out)


def _events_state(batch: Counter[str], val: Counter[str] | None, steps: Counter[str]) -> dict[str, Any]:
    """One rank's event counts, as plain dicts (they go into the checkpoint and through gather)."""
    return {
        "train": dict(batch),
        "val": dict(val or {}),
        "val_counted": val is not None,
        "steps": dict(steps),
    }


def _data_report(datasets: dict[str, Any], every: list[Any]) -> dict[str, Any]:
    """Bad input per split, counted once: the pre-scan (and reader) report of an in-memory split plus
    the events every rank met in its batches (load failures; everything of a shard stream)."""
    from copa.data.badinput import DataReport

    out = {}
    for split, key in (("train", "train"), ("val", "val")):
        total = DataReport()
        base = getattr(datasets[split], "report", None)
        if base is not None:  # identical on every rank: the pre-scan runs everywhere
            total.merge(base)
        for e in every:
            total.update(e[key])
        out[split] = total.summary()
    return out


def param_checksum(params: Any) -> float:
    """A float64 fingerprint of tensors (ranks of a DDP run must agree on it)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() + p.detach().double().pow(2).sum() for p in params))


def provenance(cfg: Config, step: int) -> dict[str, Any]:
    import platform

    return {
        "step": step,
        "data": {"train": cfg.data.train},
        "seed": cfg.seed,
        "torch": torch.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "name": cfg.name,
    }

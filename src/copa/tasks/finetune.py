"""One fine-tuning loop and one evaluation driver for every task.

``finetune`` loads a COPA model directory (``--init``, e.g. a pre-training run's ``OUT/model``),
adapts it to the fine-tuning config (resolution, keep ratios), trains ``task.loss`` in pre-training's
step loop (``copa.train.loop``: AdamW with a lower LR for the ViT, warm-up + cosine, gradient
accumulation and clipping, bf16 autocast per ``train.precision``, DDP or FSDP per
``train.distributed`` under torchrun); writes ``OUT/model`` (loadable by ``evaluate``), the loss
log ``OUT/train_log.csv`` and ``OUT/summary.json``, then evaluates on a split into ``OUT``.

``run_evaluation`` writes ``OUT/metrics.json`` (task metrics, ``baseline_*``, throughput, keep
ratio, precision, device) and ``OUT/predictions.jsonl`` (one readable JSON object per sample).

Resolution: fine-tuning runs at ``cfg.model.vision.image_size``. When it differs from the loaded
model's, the stored position table is resized once (bicubic, ``COPAModel.set_input_size``) and the
model config updated, so the saved model is consistent (the patch size must not change).
Keep ratio: fine-tuning uses ``cfg.model.select.keep_ratios``; evaluation the ``keep_ratio``
argument (CLI ``--keep-ratio``), else ``cfg.eval.keep_ratio``, else the model's own (1.0 = unpruned).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from copa.config import Config, to_dict, with_model
from copa.errors import UserError
from copa.model.copa import CONFIG_NAME, WEIGHTS_NAME, COPAModel, without_weight_init
from copa.model.feature_cache import FrozenFeatureCache
from copa.tasks.base import EvalEnv, EvalResult, Stopwatch, Task, TaskObjective, warm_up
from copa.tasks.generation import target_vocab
from copa.train import distributed as D
from copa.train.loop import NonFiniteLossError, RunLog, TrainLoop, all_finite, full_state, is_sharded, wrap
from copa.train.optim import for_training
from copa.train.trainer import make_loader
from copa.utils.device import resolve_precision

log = logging.getLogger(__name__)

META_KEY = "finetune"  # key of the fine-tuning provenance in the saved model's config.json


# --------------------------------------------------------------------------------- model
def resolve_model_dir(path: str | Path) -> Path:
    """A COPA model directory; a training run directory is accepted for its ``model/`` inside."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).exists() and (path / "model" / WEIGHTS_NAME).exists():
        return path / "model"
    return path


def saved_meta(path: str | Path) -> dict[str, Any]:
    """The fine-tuning metadata stored with a model (``{}`` for a pre-trained one)."""
    cfg_file = resolve_model_dir(path) / CONFIG_NAME
    if not cfg_file.is_file():
        return {}
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # loading the model reports the damaged file
    found = meta.get(META_KEY, {}) if isinstance(meta, dict) else {}
    return found if isinstance(found, dict) else {}


def prepare_model(cfg: Config, init: str | Path | None) -> COPAModel:
    """Load ``init`` (or build ``cfg.model`` from scratch) and adapt resolution and keep ratios."""
    if init:
        model = COPAModel.from_pretrained(resolve_model_dir(init))
    else:
        log.warning("no --init: fine-tuning from a freshly initialised model")
        model = COPAModel(cfg.model)
    model.set_input_size(cfg.model.vision.image_size)
    ratios = list(cfg.model.select.keep_ratios)
    if len(ratios) == len(model.cfg.select.layers):
        model.set_keep_ratio(ratios)
        model.cfg.select.keep_ratios = ratios
    else:
        log.warning(
            "model.select.keep_ratios %s do not match the model's %d selection layers: keeping %s",
            ratios,
            len(model.cfg.select.layers),
            model.cfg.select.keep_ratios,
        )
    return model


def unsharded(model: COPAModel, state: dict[str, torch.Tensor], device: torch.device) -> COPAModel:
    """A plain copy of an FSDP-trained ``model`` holding its full ``state``: evaluation calls the
    model's methods outside the objective's forward, where FSDP would not gather the shards."""
    with without_weight_init():  # every weight comes from ``state``; load_state_dict checks all came
        plain = COPAModel(model.cfg, load_text_weights=False)
    plain.load_state_dict(state)
    return plain.to(device).eval()


def _set_output_vocab(model: COPAModel, task: Task, dataset: Any, mode: str) -> None:
    """``train.output_vocab``: "targets" lets the decoder write only the tokens of the training
    targets (a much smaller LM head and softmax), "full" every token."""
    texts = task.decoder_targets(dataset) if mode == "targets" else None
    if not texts:
        model.set_output_vocab([])
        return
    ids = target_vocab(model, texts)
    model.set_output_vocab(ids)
    log.info("%s: the decoder writes the %d tokens of %d training targets", task.name, len(ids), len(texts))


# --------------------------------------------------------------------------------- training
@dataclass
class FinetuneResult:
    steps: int
    first_loss: float
    last_loss: float
    out: Path
    eval: EvalResult | None


def finetune(
    task: Task,
    cfg: Config,
    out: str | Path,
    init: str | Path | None = None,
    eval_split: str | None = "val",
) -> FinetuneResult:
    """Fine-tune ``task`` from ``init`` into ``out`` (see the module docstring)."""
    out, device, main = Path(out), D.init_from_env(), D.is_main()
    if main:  # the run's config as given; the fine-tuned model's own config goes to OUT/model
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = prepare_model(cfg, init)
    token = cfg.train.relevance_token
    if (cfg.train.fusion_relevance or token) and model.add_fusion_relevance(token):
        log.info(
            "the fusion reads each kept patch's relevance by the model's own selector%s",
            " and their relevance-weighted average as one more token" if token else "",
        )
    if cfg.train.box_relevance and model.add_box_relevance():
        log.info("the box head's patch scores add each kept patch's relevance by the model's own selector")
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    t = cfg.train
    # no PTA labels here: unless told otherwise the selector stays as pre-training left it
    model.freeze(t.freeze_text_layers, t.freeze_vit, t.freeze_selector is not False, t.tune_vit_suffix)
    model.to(device).train()
    cfg = with_model(cfg, model.cfg)  # the loader tokenizes and normalises as the model expects
    dtype = resolve_precision(cfg.train.precision, device)
    t, v = cfg.train, model.cfg.vision
    dataset = task.build_dataset(cfg, "train", True, v.image_size, v.patch_size)
    _set_output_vocab(model, task, dataset, t.output_vocab)
    fsdp = is_sharded(t.distributed)
    # under FSDP the encoders' units must run for their shards to be gathered: no cache there
    cached = t.feature_cache_mb > 0 and not fsdp
    cache = FrozenFeatureCache(t.feature_cache_mb * 2**20) if cached else None
    model.use_feature_cache(cache)
    wrapped = wrap(TaskObjective(model, task), t.distributed, device)
    opt, sched = for_training(model, t)  # after wrapping: FSDP replaces parameters with sharded ones
    torch.manual_seed(cfg.seed * 1000 + D.rank() + 1)  # from here on each rank draws its own randomness
    runlog = RunLog(out, main, tensorboard=False)
    curve = _curve_hook(task, model, cfg, eval_split, out) if t.eval_every else None
    if curve is not None and main:
        (out / "curve.jsonl").unlink(missing_ok=True)  # a curve of this run only
    loop = TrainLoop.from_config(
        t,
        wrapped,
        model,
        opt,
        sched,
        iter(make_loader(dataset, cfg, train=True)),
        device,
        dtype,
        where=task.name,
        runlog=runlog,
        failure_note=lambda: ", no model written",
        after_step=curve,
    )
    try:
        res = loop.run()
    finally:
        runlog.close()
        model.use_feature_cache(None)  # evaluation reads each image once: nothing to reuse
    step, losses = res.steps, res.losses
    model.eval()
    meta = {
        META_KEY: {
            "task": task.name,
            "options": task.options.to_dict(),
            "steps": step,
            "init": str(init or ""),
            "train": cfg.data.train,
        }
    }
    # under FSDP every rank takes the full weights: to check them, save them, and evaluate unsharded
    full_sd = full_state(model, None, fsdp, everywhere=True)[0]
    finite = all_finite(full_sd.values() if full_sd is not None else model.parameters())
    if not finite:  # a model that diverged without a non-finite loss is not saved
        raise NonFiniteLossError(f"non-finite parameters after {task.name} step {step}; no model written")
    if full_sd is not None:
        model = unsharded(model, full_sd, device)
    if main:
        model.save_pretrained(out / "model", extra=meta)
    summary = {
        "task": task.name,
        "steps": step,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "wall_s": res.wall_s,
        "world_size": D.world_size(),
        "precision": str(dtype).replace("torch.", ""),
        "image_size": v.image_size,
        "keep_ratios": model.keep_ratios,
        "train_samples": len(dataset),
        "data_report": dataset.report.summary(),
        "feature_cache": cache.stats.as_dict() if cache is not None else None,
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    D.barrier()
    result = run_evaluation(task, model, cfg, eval_split, out) if eval_split else None
    if curve is not None and result is not None and main:
        _append_curve(out, step, result.metrics)
    return FinetuneResult(step, summary["first_loss"], summary["last_loss"], out, result)


def _curve_hook(
    task: Task, model: COPAModel, cfg: Config, split: str | None, out: Path
) -> Callable[[int, bool], None]:
    """``train.eval_every``: an ``after_step`` that evaluates ``split`` every that many steps (the last
    step is evaluated after training, as without it) and appends the metrics to ``OUT/curve.jsonl``.
    The evaluation draws no random numbers the training would see (the RNG state is put back), so the
    run trains exactly as without it."""
    every = cfg.train.eval_every
    if not split:
        raise UserError("train.eval_every needs an evaluation split (--eval-split val or test)")
    if is_sharded(cfg.train.distributed):
        raise UserError("train.eval_every is not supported with train.distributed=fsdp (sharded weights)")

    def after_step(step: int, final: bool) -> None:
        if final or step % every:
            return
        rng = torch.get_rng_state()
        try:
            metrics = run_evaluation(task, model, cfg, split, None).metrics
        finally:
            torch.set_rng_state(rng)
        if D.is_main():
            _append_curve(out, step, metrics)

    return after_step


def _append_curve(out: Path, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    with (out / "curve.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    log.info("learning curve: step %d %s", step, {k: round(v, 4) for k, v in row.items() if k != "step"})


# --------------------------------------------------------------------------------- evaluation
def evaluation_feature_cache(mb: int) -> FrozenFeatureCache | None:
    """This process's cache for evaluations (``eval.feature_cache_mb``; 0: none). It outlives one
    evaluation — its keys carry a fingerprint of the weights that computed them
    (``COPAModel.evaluation_cache``) — so a run of many evaluations of models that share a frozen
    trunk and text encoder (the demo's ablation rows, ~40 of them) computes each test image's prefix
    and each text's states once. Asking for another size starts a new cache."""
    return _process_cache(mb) if mb > 0 else None


@functools.lru_cache(maxsize=1)  # one cache at a time: another size drops the last
def _process_cache(mb: int) -> FrozenFeatureCache:
    return FrozenFeatureCache(mb * 2**20)


def run_evaluation(
    task: Task,
    model: COPAModel,
    cfg: Config,
    split: str,
    out: str | Path | None,
    keep_ratio: float | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``cfg.data.<split>``; rank 0 writes ``metrics.json`` and
    ``predictions.jsonl`` (plus the task's extra files) into ``out``. The model's own keep ratios
    are restored afterwards."""
    device = next(model.parameters()).device
    ratio = keep_ratio if keep_ratio is not None else cfg.eval.keep_ratio
    saved = model.keep_ratios
    was_training = model.training
    if ratio is not None:
        model.set_keep_ratio(ratio)
    model.eval()
    dtype = resolve_precision(cfg.train.precision, device)
    cfg = with_model(cfg, model.cfg)  # the data is normalised as the model expects
    try:
        v = model.cfg.vision
        data = task.build_dataset(cfg, split, False, v.image_size, v.patch_size)
        env = EvalEnv(cfg, device, dtype, task.options, Stopwatch(device))
        warm_up(model, env)
        cache = evaluation_feature_cache(cfg.eval.feature_cache_mb)
        before = replace(cache.stats) if cache is not None else None
        with model.evaluation_cache(cache):
            result = task.evaluate(model, data, env)
        if cache is not None and before is not None:
            result.metrics["feature_cache"] = cache.stats.since(before).as_dict()
        result.metrics.update(
            {
                "task": task.name,
                "split": split,
                "data": getattr(cfg.data, split),
                "keep_ratio": model.keep_ratios[0] if len(set(model.keep_ratios)) == 1 else model.keep_ratios,
                "pruning": model.pruning,
                "selector": model.cfg.select.selector,
                "image_size": v.image_size,
                "precision": str(dtype).replace("torch.", ""),
                "device": str(device),
                "world_size": D.world_size(),
                "batch_size": cfg.eval.batch_size,
                "warmup_runs": cfg.eval.warmup_runs,
            }
        )
    finally:
        model.set_keep_ratio(saved)
        model.train(was_training)
    if out is not None and D.is_main():
        write_outputs(result, Path(out))
    D.barrier()
    return result


def write_outputs(result: EvalResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    with (out / "predictions.jsonl").open("w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    for name, content in result.files.items():
        (out / name).write_text(json.dumps(content, indent=1))
    log.info("wrote %s (%d predictions)", out / "metrics.json", len(result.predictions))


def evaluate_checkpoint(
    task: Task,
    ckpt: str | Path,
    cfg: Config,
    split: str = "test",
    out: str | Path | None = None,
    keep_ratio: float | None = None,
) -> EvalResult:
    """Load a saved model (``COPAModel.save_pretrained`` directory) and ``run_evaluation``; the
    model's architecture and resolution come from the checkpoint, data and eval settings from ``cfg``."""
    device = D.init_from_env()
    model = COPAModel.from_pretrained(resolve_model_dir(ckpt), map_location="cpu").to(device).eval()
    return run_evaluation(task, model, cfg, split, out, keep_ratio)

"""``copa bench retrieval``: two-stage retrieval on a real gallery, stage by stage.

For a saved model (``--ckpt``) or the config's model with random weights, and a retrieval split
(``--data FILE.json`` or the config's ``data.<split>``; ``copa data synth`` writes one), it runs the
evaluation's two stages (``copa.tasks.retrieval``) on the whole gallery and times them:

- **ITC stage**: text-agnostic image embeddings, text embeddings and their similarity (I, T);
- **ITM re-rank** of each query's ``itm_topk`` candidates (both directions, each pair once), batched
  across queries (``itm_scores_batched``), **with prefix reuse** (each image's text-independent ViT
  prefix once, indexed per pair) and **without** (the prefix re-run for every pair).

Both stages run at the model's keep ratio (``--keep-ratio`` overrides it) and unpruned (keep 1.0):
each keep setting ranks its own ITC candidates, exactly as ``copa evaluate retrieval --keep-ratio``
would. Every record carries the recall of its own scores: reuse and no reuse compute the same
scores (up to float rounding), so their R@1 must agree; the JSON says how far their scores differ.

Timing: the gallery is decoded once into memory first (data loading is not timed), every path gets
``--warmup`` untimed passes on one batch, then ``--runs`` timed runs of every stage, interleaved run
by run (``copa.bench.timing.time_interleaved``, with its ``--min-util`` contention check); the median
is reported. Scores come from fixed weights and data, so only the timings vary between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from copa.bench.hardware import bench_precisions, dtype_name, hardware_info
from copa.bench.keep import BenchError
from copa.bench.timing import time_interleaved, timing_stats
from copa.config import Config, with_model
from copa.utils.device import autocast, sync

log = logging.getLogger(__name__)

JSON_NAME = "retrieval_bench.json"


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags only ``copa bench retrieval`` reads (shared ones: --batch, --runs, --warmup,
    --precision, --min-util, --threads, --device, --seed, --json, --out)."""
    g = p.add_argument_group("copa bench retrieval")
    g.add_argument(
        "--ckpt", default=None, help="saved COPA model dir (default: the config's model, random weights)"
    )
    g.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="retrieval split json (default: the config's data.<--split>)",
    )
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="split without --data")
    g.add_argument(
        "--n-images", type=int, default=None, help="only the first N images of the split (and their captions)"
    )
    g.add_argument(
        "--itm-topk", type=int, default=None, help="candidates re-ranked per query (default eval.itm_topk)"
    )
    g.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="the pruned setting's keep ratio (default: the model's)",
    )
    g.add_argument(
        "--itc-weight",
        type=float,
        default=None,
        help="final score = ITM + w * ITC (default: the model's, else 1)",
    )


@dataclasses.dataclass
class Gallery:
    """The gallery in memory: ``images`` (I, 3, H, W) on the device, tokenized texts ``ids``,
    ``mask`` (T, L) on the device, ``text_image`` (T,) the image each text describes."""

    images: Tensor
    ids: Tensor
    mask: Tensor
    text_image: Tensor

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_texts(self) -> int:
        return self.ids.shape[0]


class RegionTimer:
    """``region(name)`` context managers for ``itm_scores_batched``: autocast plus seconds per name
    (text encoding, prefixes, pairs) of the current run."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        t = time.perf_counter()
        with autocast(self.device, self.dtype):
            yield
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def _chunks(gallery: Gallery, batch: int, stop: int | None = None) -> Iterator[tuple[list[int], Tensor]]:
    n = gallery.num_images if stop is None else min(stop, gallery.num_images)
    for s in range(0, n, batch):
        e = min(s + batch, n)
        yield list(range(s, e)), gallery.images[s:e]


@torch.no_grad()
def itc_similarity(
    model: Any,
    gallery: Gallery,
    batch: int,
    dtype: torch.dtype,
    n_img: int | None = None,
    n_txt: int | None = None,
) -> Tensor:
    """ITC stage: image embeddings, text embeddings (``batch`` at a time), similarity (I, T) on the CPU."""
    device = gallery.images.device
    ni = gallery.num_images if n_img is None else n_img
    nt = gallery.num_texts if n_txt is None else n_txt
    with autocast(device, dtype):
        img = torch.cat(
            [model.encode_image(gallery.images[s : min(s + batch, ni)]).float() for s in range(0, ni, batch)]
        )
        txt = torch.cat(
            [
                model.encode_text(
                    gallery.ids[s : min(s + batch, nt)], gallery.mask[s : min(s + batch, nt)]
                ).float()
                for s in range(0, nt, batch)
            ]
        )
    return (img @ txt.t()).cpu()  # (I, T) cosine similarities


def load_gallery(cfg: Config, model: Any, split: str, n_images: int | None, device: torch.device) -> Gallery:
    """The split's retrieval gallery (as ``copa evaluate retrieval`` builds it: records naming one
    image pool their captions), decoded into memory at the model's resolution."""
    from copa.data.collate import Collator
    from copa.tasks.base import eval_loader
    from copa.tasks.retrieval import RetrievalData, RetrievalTask, stack_images

    v = model.cfg.vision
    data = RetrievalTask().build_dataset(cfg, split, False, v.image_size, v.patch_size)
    if n_images is not None and n_images < data.num_images:
        keep = data.text_image < n_images
        texts = [t for t, k in zip(data.texts, keep.tolist(), strict=True) if k]
        data = RetrievalData(data.dataset, data.image_rows[:n_images], texts, data.text_image[keep])
    if data.num_images < 2 or not data.texts:
        raise BenchError(f"the gallery needs at least 2 images with captions, got {data.num_images}")
    t = time.perf_counter()
    loader = eval_loader(data.dataset, data.image_rows, 64, stack_images, cfg.data.num_workers)
    images = torch.cat(list(loader)).to(device)
    ids, mask = Collator(model.cfg.text.tokenizer, model.cfg.text.max_len).tokenize(data.texts)
    log.info(
        "gallery: %d images, %d texts, decoded in %.1f s (%.0f MB)",
        data.num_images,
        len(data.texts),
        time.perf_counter() - t,
        images.numel() * images.element_size() / 2**20,
    )
    return Gallery(images, ids.to(device), mask.to(device), data.text_image.clone())


def bench_retrieval(
    model: Any,
    gallery: Gallery,
    settings: list[tuple[str, list[float]]],
    *,
    batch: int = 32,
    itm_topk: int = 16,
    itc_weight: float = 1.0,
    runs: int = 1,
    warmup: int = 1,
    dtype: torch.dtype = torch.float32,
    min_util: float = 0.0,
) -> dict[str, Any]:
    """Time the ITC stage and the ITM re-rank with and without prefix reuse for every keep setting
    (name, keep ratios per selection stage; the unpruned one named "unpruned"), and the recall of
    each. Returns ``{"results": [record per (setting, reuse)], "speedup_reuse", "speedup_pruning",
    "reuse_max_abs_diff", ...}``; the model's own keep ratios are restored."""
    from copa.tasks.metrics import retrieval_metrics
    from copa.tasks.retrieval import itm_scores_batched, rerank_candidates

    device = gallery.images.device
    saved = model.keep_ratios
    was_training = model.training
    model.eval()
    sims: dict[str, Tensor] = {}
    scores: dict[str, Tensor] = {}
    regions: dict[str, list[dict[str, float]]] = {}
    pairs: dict[str, Tensor] = {}

    def itc_fn(name: str, ratios: list[float]) -> Callable[[], None]:
        def f() -> None:
            model.set_keep_ratio(ratios)
            sims[name] = itc_similarity(model, gallery, batch, dtype)
            pairs[name] = rerank_candidates(sims[name], itm_topk).pairs

        return f

    def itm_fn(name: str, ratios: list[float], reuse: bool) -> Callable[[], None]:
        key = f"{name}|{'reuse' if reuse else 'no_reuse'}"

        def f() -> None:
            model.set_keep_ratio(ratios)
            timer = RegionTimer(device, dtype)
            scores[key] = itm_scores_batched(
                model, _chunks(gallery, batch), pairs[name], gallery.ids, gallery.mask, batch, reuse, timer
            )
            regions.setdefault(key, []).append(timer.seconds)

        return f

    try:
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(warmup):  # one batch through every path: kernel selection, allocator growth
                for _, ratios in settings:
                    model.set_keep_ratio(ratios)
                    itc_similarity(
                        model,
                        gallery,
                        batch,
                        dtype,
                        min(batch, gallery.num_images),
                        min(batch, gallery.num_texts),
                    )
                    n = min(batch, gallery.num_images)
                    grid = torch.meshgrid(
                        torch.arange(n), torch.arange(min(2, gallery.num_texts)), indexing="ij"
                    )
                    warm = torch.stack(grid, -1).reshape(-1, 2)  # (image, text) pairs of the first chunk
                    for reuse in (True, False):
                        itm_scores_batched(
                            model,
                            _chunks(gallery, batch, n),
                            warm[:batch],
                            gallery.ids,
                            gallery.mask,
                            batch,
                            reuse,
                            RegionTimer(device, dtype),
                        )
            if warmup:
                log.info(
                    "warm-up: %d pass(es) of one batch per path in %.1f s", warmup, time.perf_counter() - t
                )
            fns: dict[str, Callable[[], None]] = {}
            for name, ratios in settings:  # ITC first: the re-rank of a setting scores its candidates
                fns[f"{name}|itc"] = itc_fn(name, ratios)
                fns[f"{name}|reuse"] = itm_fn(name, ratios, True)
                fns[f"{name}|no_reuse"] = itm_fn(name, ratios, False)
            log.info(
                "timing %d settings x (ITC, ITM with / without prefix reuse) x %d run(s): "
                "%d images, %d texts",
                len(settings),
                runs,
                gallery.num_images,
                gallery.num_texts,
            )
            tm = time_interleaved(fns, 0, runs, device, min_util)
    finally:
        model.set_keep_ratio(saved)
        model.train(was_training)

    med = {k: statistics.median(v) for k, v in tm.seconds.items()}
    records: list[dict[str, Any]] = []
    diffs: dict[str, float] = {}
    for name, ratios in settings:
        sim, cand_pairs = sims[name], pairs[name]
        cand = rerank_candidates(sim, itm_topk)
        itc_m = retrieval_metrics(sim, sim.t(), gallery.text_image)
        diffs[name] = float((scores[f"{name}|reuse"] - scores[f"{name}|no_reuse"]).abs().max())
        for reuse in (True, False):
            key = f"{name}|{'reuse' if reuse else 'no_reuse'}"
            i2t, t2i = cand.final_scores(sim, scores[key], itc_weight)
            m = retrieval_metrics(i2t, t2i, gallery.text_image)
            itc_s, itm_s = med[f"{name}|itc"], med[key]
            breakdown = {
                r: statistics.median(d.get(r, 0.0) for d in regions[key]) for r in ("text", "prefix", "pairs")
            }
            records.append(
                {
                    "setting": name,
                    "keep_ratio": ratios[0] if len(set(ratios)) == 1 else ratios,
                    "pruning": name != "unpruned",
                    "prefix_reuse": reuse,
                    "itm_pairs": int(cand_pairs.shape[0]),
                    "itc_s": itc_s,
                    "itm_s": itm_s,
                    "total_s": itc_s + itm_s,
                    "images_per_s": gallery.num_images / (itc_s + itm_s),  # the whole two-stage retrieval
                    "itc_images_per_s": gallery.num_images / itc_s,
                    "itm_pairs_per_s": cand_pairs.shape[0] / itm_s,
                    "itm_breakdown_s": breakdown,  # text encoding (once per text), prefixes, pair forwards
                    "i2t_r1": m["i2t_r1"],
                    "t2i_r1": m["t2i_r1"],
                    "r_mean": m["r_mean"],
                    "itc_i2t_r1": itc_m["i2t_r1"],
                    "itc_t2i_r1": itc_m["t2i_r1"],
                    "itc_timing": timing_stats(tm.seconds[f"{name}|itc"], tm.util[f"{name}|itc"]),
                    "itm_timing": timing_stats(tm.seconds[key], tm.util[key]),
                }
            )
    by = {(r["setting"], r["prefix_reuse"]): r for r in records}
    for r in records:
        r["speedup_reuse"] = by[(r["setting"], False)]["itm_s"] / r["itm_s"]
        base = by.get(("unpruned", r["prefix_reuse"]))
        r["speedup_pruning_itm"] = base["itm_s"] / r["itm_s"] if base else None
        r["speedup_pruning_total"] = base["total_s"] / r["total_s"] if base else None
    pruned = [n for n, _ in settings if n != "unpruned"]
    return {
        "results": records,
        "speedup_reuse": {n: by[(n, True)]["speedup_reuse"] for n, _ in settings},
        "speedup_pruning": {
            n: {
                "itc": by[("unpruned", True)]["itc_s"] / by[(n, True)]["itc_s"],
                "itm": by[(n, True)]["speedup_pruning_itm"],
                "total": by[(n, True)]["speedup_pruning_total"],
            }
            for n in pruned
            if ("unpruned", True) in by
        },
        "reuse_max_abs_diff": diffs,
        "reuse_same_r1": all(
            by[(n, True)]["i2t_r1"] == by[(n, False)]["i2t_r1"]
            and by[(n, True)]["t2i_r1"] == by[(n, False)]["t2i_r1"]
            for n, _ in settings
        ),
        "retried_calls": tm.retried,
        "waited_s": round(tm.waited_s, 1),
    }


def format_retrieval_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of ``bench_retrieval`` records."""
    head = (
        "| keep | prefix reuse | ITM pairs | ITC s | ITM s | total s | images/s | ITM pairs/s "
        "| speedup reuse | speedup pruning (ITM) | i2t R@1 | t2i R@1 | ITC i2t R@1 | ITC t2i R@1 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        prune = "-" if r["speedup_pruning_itm"] is None else f"{r['speedup_pruning_itm']:.2f}x"
        lines.append(
            f"| {r['setting']} ({r['keep_ratio']}) | {'yes' if r['prefix_reuse'] else 'no'} "
            f"| {r['itm_pairs']} "
            f"| {r['itc_s']:.2f} | {r['itm_s']:.2f} | {r['total_s']:.2f} | {r['images_per_s']:.2f} "
            f"| {r['itm_pairs_per_s']:.1f} | {r['speedup_reuse']:.2f}x | {prune} "
            f"| {r['i2t_r1']:.1f} | {r['t2i_r1']:.1f} | {r['itc_i2t_r1']:.1f} | {r['itc_t2i_r1']:.1f} |"
        )
    return "\n".join(lines)


def run_retrieval(args: argparse.Namespace, cfg: Config) -> int:
    """``copa bench retrieval``: see the module docstring. Writes ``--json`` (default
    ``retrieval_bench.json``) and the same name with ``.md`` into ``--out``."""
    from copa.bench.harness import build_bench_model
    from copa.model.copa import COPAModel
    from copa.tasks.finetune import resolve_model_dir, saved_meta
    from copa.utils.device import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    batch = args.batch or cfg.eval.batch_size
    runs = args.runs or 1
    warmup = 1 if args.warmup is None else args.warmup
    topk = args.itm_topk or cfg.eval.itm_topk
    for flag, value in (("batch", batch), ("runs", runs), ("itm-topk", topk)):
        if value < 1:
            raise BenchError(f"--{flag} must be >= 1")
    if args.n_images is not None and args.n_images < 2:
        raise BenchError("--n-images must be >= 2")
    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise BenchError(f"--keep-ratio {args.keep_ratio} is outside (0, 1]")
    if args.precision == "both":
        raise BenchError("copa bench retrieval runs one precision: auto, fp32 or bf16")
    dtype = bench_precisions(args.precision, device)[0]
    if args.ckpt:
        model = COPAModel.from_pretrained(resolve_model_dir(args.ckpt), map_location="cpu").to(device).eval()
        options = saved_meta(args.ckpt).get("options") or {}
    else:
        model = build_bench_model(cfg, None, device, args.seed)
        options = {}
    itc_weight = args.itc_weight if args.itc_weight is not None else float(options.get("itc_weight", 1.0))
    cfg = with_model(cfg, model.cfg)  # the data is normalised as the model expects
    split = args.split
    if args.data:
        cfg.data.test, split = args.data, "test"
    torch.manual_seed(args.seed)
    gallery = load_gallery(cfg, model, split, args.n_images, device)

    pruned = [args.keep_ratio] * len(model.keep_ratios) if args.keep_ratio is not None else model.keep_ratios
    settings: list[tuple[str, list[float]]] = []
    if model.has_selectors and min(pruned) < 1.0:
        settings.append(("pruned", pruned))
    else:
        log.warning(
            "the model does not prune (selector %s, keep %s): unpruned only",
            model.cfg.select.selector,
            pruned,
        )
    settings.append(("unpruned", [1.0] * len(model.keep_ratios)))
    hw = hardware_info(device)
    counts = torch.bincount(gallery.text_image, minlength=gallery.num_images).float()
    result: dict[str, Any] = {
        "command": shlex.join(["copa", *getattr(args, "argv", sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hardware": hw,
        "config": args.config,
        "overrides": args.overrides,
        "ckpt": args.ckpt,
        "data": getattr(cfg.data, split),
        "split": split,
        "num_images": gallery.num_images,
        "num_texts": gallery.num_texts,
        "captions_per_image": {
            "min": int(counts.min()),
            "mean": float(counts.mean()),
            "max": int(counts.max()),
        },
        "image_size": model.cfg.vision.image_size,
        "patches": model.num_patches,
        "selector": model.cfg.select.selector,
        "keep_ratios_pruned": pruned if settings[0][0] == "pruned" else None,
        "itm_topk": topk,
        "itc_weight": itc_weight,
        "batch_size": batch,
        "precision": dtype_name(dtype),
        "runs": runs,
        "warmup": warmup,
        "seed": args.seed,
        "min_util": args.min_util,
        "timing": "median of runs; ITC and both re-ranks of every setting interleaved run by run; images "
        "decoded before timing",
    }
    result.update(
        bench_retrieval(
            model,
            gallery,
            settings,
            batch=batch,
            itm_topk=topk,
            itc_weight=itc_weight,
            runs=runs,
            warmup=warmup,
            dtype=dtype,
            min_util=args.min_util,
        )
    )
    hw["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    out_dir = Path(args.out or "runs/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (args.json or JSON_NAME)
    path.write_text(json.dumps(result, indent=2))
    header = (
        f"retrieval: {gallery.num_images} images x {result['captions_per_image']['mean']:.1f} captions, "
        f"top-{topk} re-rank, batch {batch}, {result['precision']}, {hw['cpu']} "
        f"({hw['cpu_cores_usable']} cores, "
        f"{hw['torch_threads']} threads), torch {hw['torch']}" + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
    )
    lines = [header, "", format_retrieval_table(result["results"]), ""]
    lines += [
        f"- prefix reuse speedup of the ITM re-rank, {n}: {s:.2f}x"
        for n, s in result["speedup_reuse"].items()
    ]
    for n, s in result["speedup_pruning"].items():
        lines.append(
            f"- pruning speedup ({n}, with reuse): ITC {s['itc']:.2f}x, ITM {s['itm']:.2f}x, "
            f"total {s['total']:.2f}x"
        )
    lines.append(
        "- reuse vs no reuse: max |score difference| "
        + ", ".join(f"{n} {d:.2e}" for n, d in result["reuse_max_abs_diff"].items())
        + f"; same R@1: {result['reuse_same_r1']}"
    )
    md = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(md)
    print(md)  # the command's one final table, as copa bench prints its own
    print(f"JSON: {path}")
    return 0

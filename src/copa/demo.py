"""``copa demo``: the main job end to end on the embedded synthetic scenes.

Stages (each logs what it does; results accumulate in ``OUT/results.json``):
synthetic data -> pre-training with PTA -> PTA quality and selector ablation -> downstream tasks ->
benchmark -> ``OUT/report.md`` + ``OUT/report.html`` with tables and pictures.
``--quick`` runs the same pipeline with smaller data and budgets (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from copa.config import Config, load_config

log = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    pretrain_steps: int = 120
    pretrain_budget_s: float = 330.0
    batch_size: int = 32
    eval_images: int = 200
    picture_images: int = 4
    keep_sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    finetune_steps: int = 40
    finetune_budget_s: float = 60.0
    no_pta_pretrain: bool = True
    # the first steps run once without PTA and both pre-trainings (COPA, no-PTA ablation) branch
    # from there: same data order and compute, PTA on or off for the rest; 0 = two separate runs
    shared_steps: int = 0
    itm_topk: int = 16


FULL = DemoPlan(n_train=2000, n_val=100, n_test=100, pretrain_steps=80, shared_steps=40, pretrain_budget_s=120.0,
                eval_images=100, finetune_steps=40, finetune_budget_s=25.0, itm_topk=4)
QUICK = DemoPlan(n_train=240, n_val=32, n_test=32, pretrain_steps=12, pretrain_budget_s=45.0, batch_size=16,
                 eval_images=32, picture_images=2, keep_sweep=[0.25, 0.5, 1.0], finetune_steps=4,
                 finetune_budget_s=15.0, no_pta_pretrain=False)

# task -> (headline metric key in metrics.json, its label)
TASK_METRICS = {"retrieval": ("r_mean", "mean recall (%)"), "vqa": ("accuracy", "accuracy (%)"),
                "caption": ("cider", "CIDEr"), "grounding": ("acc@0.5", "accuracy@IoU0.5 (%)")}


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic scenes, with a report")
    add_common(p, out_default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small data and budgets (about 3 minutes)")
    p.set_defaults(func=run)


def set_flags(sets: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"] (for the reproduce commands)."""
    return [a for s in sets for a in ("--set", s)]


class Demo:
    def __init__(self, args: argparse.Namespace, cfg: Config) -> None:
        self.plan = QUICK if args.quick else FULL
        self.quick = args.quick
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.overrides = list(args.overrides)
        self.config_path = args.config or "configs/pretrain_tiny.yaml"
        self.results: dict[str, Any] = {"quick": self.quick, "commands": [], "timings_s": {}}
        self.data = self.out / "data"
        self.t0 = time.perf_counter()

    # -------------------------------------------------------------- helpers
    def stage(self, name: str):
        demo = self

        class _Stage:
            def __enter__(self) -> None:
                self.t = time.perf_counter()
                log.info("=== demo stage: %s (%.0f s elapsed) ===", name, time.perf_counter() - demo.t0)

            def __exit__(self, *exc: object) -> None:
                demo.results["timings_s"][name] = round(time.perf_counter() - self.t, 1)
                demo.save()

        return _Stage()

    def command(self, argv: list[str]) -> None:
        """Record the exact CLI command that reproduces a number."""
        self.results["commands"].append("copa " + " ".join(shlex.quote(a) for a in argv))

    def config(self, *extra: str) -> Config:
        return load_config(self.config_path, [*self.base_sets(), *self.overrides, *extra])

    def base_sets(self) -> list[str]:
        p = self.plan
        return [f"data.train={self.data}/train.json", f"data.val={self.data}/val.json",
                f"data.test={self.data}/test.json", f"train.batch_size={p.batch_size}", f"eval.itm_topk={p.itm_topk}"]

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    # -------------------------------------------------------------- stages
    def synth(self) -> None:
        from copa.data.synth import write_synth

        with self.stage("synthetic data"):
            p = self.plan
            if (self.data / "train.json").exists() and (self.data / "summary.json").exists():
                log.info("reusing %s", self.data)
            else:
                write_synth(self.data, seed=0, n_train=p.n_train, n_val=p.n_val, n_test=p.n_test)
            self.command(["data", "synth", "--out", str(self.data), "--n-train", str(p.n_train),
                          "--n-val", str(p.n_val), "--n-test", str(p.n_test), "--seed", "0"])
            self.results["data"] = {"train": p.n_train, "val": p.n_val, "test": p.n_test}

    def pretrain(self, name: str = "pretrain", extra: tuple[str, ...] = (), stop_at: int | None = None,
                 branch_from: Path | None = None) -> Path:
        from copa.train.trainer import pretrain

        p = self.plan
        every = p.shared_steps or p.pretrain_steps
        sets = [f"train.steps={p.pretrain_steps}", f"train.time_budget_s={p.pretrain_budget_s}",
                f"train.val_every={max(1, p.pretrain_steps // 2)}", f"train.ckpt_every={every}",
                f"train.warmup={max(2, p.pretrain_steps // 10)}", *extra]
        cfg = self.config(*sets)
        out = self.out / name
        with self.stage(name):
            if branch_from is not None and out.exists():  # a re-run of the demo: branch afresh
                shutil.rmtree(out)
            res = pretrain(cfg, out, stop_at=stop_at, branch_from=branch_from)
            flags = ["--stop-at", str(stop_at)] if stop_at is not None else []
            flags += ["--branch-from", str(branch_from)] if branch_from is not None else []
            self.command(["pretrain", "--config", self.config_path, "--out", str(out), *flags,
                          *set_flags([*self.base_sets(), *self.overrides, *sets])])
            summary = json.loads((out / "summary.json").read_text())
            self.results[name] = {"steps": res.steps, "final_val": res.final, "wall_s": summary["wall_s"],
                                  "stopped_early": summary["stopped_early"] and stop_at is None,
                                  "precision": summary["precision"], "branched_from": str(branch_from or "")}
        return out / "model"

    def pretrain_all(self) -> tuple[Path, Path | None]:
        """The COPA pre-training and, for the ablation, the same pre-training without PTA."""
        p = self.plan
        no_pta = ("train.loss_weights.pta=0.0",)
        if not p.no_pta_pretrain:
            return self.pretrain(), None
        if p.shared_steps <= 0:
            return self.pretrain(), self.pretrain("pretrain_no_pta", no_pta)
        self.pretrain("pretrain_shared", no_pta, stop_at=p.shared_steps)
        trunk = self.out / "pretrain_shared"
        self.results["pretrain_shared_steps"] = p.shared_steps
        return self.pretrain(branch_from=trunk), self.pretrain("pretrain_no_pta", no_pta, branch_from=trunk)

    def selector_ablation(self, model_dir: Path, no_pta_dir: Path | None) -> None:
        """Object-patch recall / AP on the test split per selector, at the same keep ratio."""
        from copa.evaluation import pta_eval, with_selector
        from copa.model.copa import load

        with self.stage("selector ablation (PTA quality)"):
            cfg = self.config()
            model = load(model_dir)
            keep = cfg.model.select.keep_ratios[0]
            rows = {}
            for sel in ("none", "cls_attn", "text_attn", "tpd"):
                m = with_selector(model, sel)
                rows[sel if sel != "tpd" else "tpd + PTA (COPA)"] = pta_eval(m, cfg, "test", keep, self.plan.eval_images)
            if no_pta_dir is not None:
                rows["tpd without PTA"] = pta_eval(load(no_pta_dir), cfg, "test", keep, self.plan.eval_images)
            self.results["ablation_pta"] = {"keep_ratio": keep, "rows": rows}
            sweep = {}
            for r in self.plan.keep_sweep:
                sweep[r] = pta_eval(model, cfg, "test", r, self.plan.eval_images)
            self.results["pta_vs_keep"] = sweep

    def tasks(self, model_dir: Path, no_pta_dir: Path | None) -> None:
        """Fine-tune each task once (TPD + PTA model), evaluate pruned and unpruned, and with the
        other selectors swapped in (same weights) for the ablation table."""
        from copa.evaluation import with_selector
        from copa.model.copa import load
        from copa.tasks.base import TaskOptions
        from copa.tasks.finetune import finetune, run_evaluation
        from copa.tasks.registry import make_task

        p = self.plan
        sets = [f"train.steps={p.finetune_steps}", f"train.time_budget_s={p.finetune_budget_s}",
                f"train.warmup={max(1, p.finetune_steps // 10)}", "train.lr=1e-4", "train.lr_vit=1e-4"]
        cfg = self.config(*sets)
        keep = cfg.model.select.keep_ratios[0]
        self.results.setdefault("tasks", {})
        self.results.setdefault("ablation_tasks", {})
        ablation = self.results["ablation_tasks"]
        for name, (key, label) in TASK_METRICS.items():
            with self.stage(f"task: {name}"):
                task = make_task(name, TaskOptions(meteor=not self.quick))
                out = self.out / "tasks" / name
                finetune(task, cfg, out, init=model_dir, eval_split=None)
                self.command(["finetune", name, "--config", self.config_path, "--init", str(model_dir),
                              "--out", str(out), *set_flags([*self.base_sets(), *self.overrides, *sets])])
                model = load(out / "model")
                rows = {}
                for setting, ratio in ((f"pruned (keep {keep})", keep), ("unpruned (keep 1.0)", 1.0)):
                    tag = "pruned" if ratio < 1.0 else "unpruned"
                    res = run_evaluation(task, model, cfg, "test", out / f"test_{tag}", ratio)
                    self.command(["evaluate", name, "--ckpt", str(out / "model"), "--split", "test",
                                  "--keep-ratio", str(ratio), "--out", str(out / f"test_{tag}")])
                    m = res.metrics
                    rows[setting] = {"metric_name": label, "metric": m.get(key), "baseline": m.get(f"baseline_{key}"),
                                     "samples_per_s": m.get("samples_per_s"), "keep_ratio": ratio}
                    if ratio == 1.0:
                        ablation.setdefault("none", {})[f"{name}_metric"] = m.get(key)
                        ablation["none"][f"{name}_sps"] = m.get("samples_per_s")
                    else:
                        ablation.setdefault("tpd + PTA (COPA)", {})[f"{name}_metric"] = m.get(key)
                        ablation["tpd + PTA (COPA)"][f"{name}_sps"] = m.get("samples_per_s")
                self.results["tasks"][name] = rows
                if name in ("vqa", "grounding"):  # task accuracy vs keep ratio, same fine-tuned weights
                    curve = {keep: rows[f"pruned (keep {keep})"]["metric"], 1.0: rows["unpruned (keep 1.0)"]["metric"]}
                    for r in self.plan.keep_sweep:
                        if r not in curve:
                            curve[r] = run_evaluation(task, model, cfg, "test", None, r).metrics.get(key)
                    self.results.setdefault("task_vs_keep", {})[name] = dict(sorted(curve.items()))
                if name in ("vqa", "grounding", "retrieval"):
                    for sel in ("cls_attn", "text_attn"):
                        res = run_evaluation(task, with_selector(model, sel), cfg, "test", None, keep)
                        ablation.setdefault(sel, {})[f"{name}_metric"] = res.metrics.get(key)
                        ablation[sel][f"{name}_sps"] = res.metrics.get("samples_per_s")
                    if no_pta_dir is not None:
                        out2 = self.out / "tasks_no_pta" / name
                        finetune(task, cfg, out2, init=no_pta_dir, eval_split=None)
                        res = run_evaluation(task, load(out2 / "model"), cfg, "test", None, keep)
                        ablation.setdefault("tpd without PTA", {})[f"{name}_metric"] = res.metrics.get(key)
                        ablation["tpd without PTA"][f"{name}_sps"] = res.metrics.get("samples_per_s")
                    torch.set_grad_enabled(True)

    def bench(self) -> None:
        """copa bench on the tiny preset: speed vs keep ratio, pruned and unpruned in one run."""
        from copa.bench import bench_inference, build_bench_model, hardware_info, parse_keeps
        from copa.viz import xy_plot

        with self.stage("benchmark"):
            cfg = self.config()
            layer = cfg.model.select.layers[0]
            specs = [f"{layer}:{r:g}" for r in self.plan.keep_sweep if r < 1.0]
            model = build_bench_model(cfg, None, torch.device("cpu"))
            runs = 2 if self.quick else 5
            recs = bench_inference(model, parse_keeps(specs, cfg.model.vision.layers), batch=8, runs=runs, warmup=1)
            self.command(["bench", "--config", self.config_path, "--batch", "8", "--runs", str(runs),
                          *[a for k in specs for a in ("--keep", k)], "--out", str(self.out / "bench")])
            hw = hardware_info(torch.device("cpu"))
            rows = [{"setting": r["keep"], **{k: r.get(k) for k in ("flops_ratio", "speedup_vit", "speedup_e2e",
                                                                      "efficiency", "pairs_per_s", "images_per_s")}}
                    for r in recs]
            self.results["bench"] = {"hardware": f"{hw['cpu']}, {hw['torch_threads']} threads, torch {hw['torch']}, "
                                                 f"batch 8, median of {runs} runs", "rows": rows}
            keep_of = {f"{layer}:{r:g}": r for r in self.plan.keep_sweep}
            pts = sorted((keep_of.get(r["setting"], 1.0), r) for r in rows)
            pics = self.results.setdefault("pictures", {})
            pics["speed_vs_keep"] = xy_plot(
                self.out / "speed_vs_keep.png",
                {"end-to-end pairs/s": ([k for k, _ in pts], [r["pairs_per_s"] for _, r in pts]),
                 "ViT images/s": ([k for k, _ in pts], [r["images_per_s"] for _, r in pts])},
                "keep ratio", "throughput", "Speed vs keep ratio (tiny, this machine)").name
            sweep = self.results.get("pta_vs_keep", {})
            if sweep:
                ks = sorted(sweep)
                series = {"object-patch recall (phrase)": (ks, [sweep[k].get("recall_phrase") for k in ks]),
                          "object-patch recall (text-agnostic)": (ks, [sweep[k].get("recall_agnostic") for k in ks]),
                          "random selection (recall)": (ks, [sweep[k].get("recall_random", k) for k in ks])}
                for task, label in (("vqa", "VQA accuracy"), ("grounding", "grounding acc@0.5")):
                    curve = self.results.get("task_vs_keep", {}).get(task)
                    if curve:  # percentages -> fractions, to share the axis with recall
                        kk = sorted(curve)
                        series[label] = (kk, [None if curve[k] is None else curve[k] / 100 for k in kk])
                pics["accuracy_vs_keep"] = xy_plot(
                    self.out / "accuracy_vs_keep.png", series, "keep ratio", "recall / accuracy (fraction)",
                    "Accuracy vs keep ratio (test split)").name

    def pictures(self, model_dir: Path) -> None:
        from copa.evaluation import kept_for_texts
        from copa.model.copa import load
        from copa.viz import kept_patches_figure, loss_curves

        with self.stage("pictures"):
            pics = {}
            train_csv = self.out / "pretrain" / "train_log.csv"
            if train_csv.exists():
                pics["loss_curves"] = loss_curves(self.out / "loss_curves.png", train_csv,
                                                  self.out / "pretrain" / "val_log.csv").name
            cfg = self.config()
            model = load(model_dir)
            rows = kept_for_texts(model, cfg, "test", self.plan.picture_images)
            if rows:
                pics["kept_patches"] = kept_patches_figure(self.out / "kept_patches.png", rows, model.vision.grid,
                                                           cfg.model.vision.image_size).name
            self.results.setdefault("pictures", {}).update(pics)

    def report(self) -> None:
        from copa.report import write_report

        self.results["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        md, html = write_report(self.out, self.results)
        log.info("report: %s and %s (%.0f s in all)", md, html, self.results["total_s"])

    def run(self) -> int:
        self.synth()
        model, no_pta = self.pretrain_all()
        self.selector_ablation(model, no_pta)
        self.tasks(model, no_pta)
        self.bench()
        self.pictures(model)
        self.report()
        return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    torch.manual_seed(0)
    return Demo(args, cfg).run()

"""``copa demo``: the main job end to end on the embedded synthetic scenes.

Stages (each logs what it does; results accumulate in ``OUT/results.json``):
synthetic data -> pre-training with PTA -> PTA quality and selector ablation -> downstream tasks ->
benchmark -> ``OUT/report.md`` + ``OUT/report.html`` with tables and pictures.
``--quick`` runs the same pipeline with smaller data and budgets (CI runs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
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


FULL = DemoPlan()
QUICK = DemoPlan(n_train=240, n_val=48, n_test=48, pretrain_steps=16, pretrain_budget_s=60.0, batch_size=16,
                 eval_images=48, picture_images=2, keep_sweep=[0.25, 0.5, 1.0])


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic scenes, with a report")
    add_common(p, out_default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small data and budgets (about 3 minutes)")
    p.set_defaults(func=run)


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
    def stage(self, name: str):  # noqa: ANN201
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
                f"data.test={self.data}/test.json", f"train.batch_size={p.batch_size}"]

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

    def pretrain(self, name: str = "pretrain", extra: tuple[str, ...] = ()) -> Path:
        from copa.train.trainer import pretrain

        p = self.plan
        sets = [f"train.steps={p.pretrain_steps}", f"train.time_budget_s={p.pretrain_budget_s}",
                f"train.val_every={max(1, p.pretrain_steps // 4)}", f"train.ckpt_every={p.pretrain_steps}",
                f"train.warmup={max(2, p.pretrain_steps // 10)}", *extra]
        cfg = self.config(*sets)
        out = self.out / name
        with self.stage(name):
            res = pretrain(cfg, out)
            self.command(["pretrain", "--config", self.config_path, "--out", str(out),
                          *sum((["--set", s] for s in [*self.base_sets(), *self.overrides, *sets]), [])])
            summary = json.loads((out / "summary.json").read_text())
            self.results[name] = {"steps": res.steps, "final_val": res.final, "wall_s": summary["wall_s"],
                                  "stopped_early": summary["stopped_early"], "precision": summary["precision"]}
        return out / "model"

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
            self.results["pictures"] = pics

    def report(self) -> None:
        from copa.report import write_report

        self.results["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        md, html = write_report(self.out, self.results)
        log.info("report: %s and %s (%.0f s in all)", md, html, self.results["total_s"])

    def run(self) -> int:
        self.synth()
        model = self.pretrain()
        no_pta = None
        if not self.quick:
            no_pta = self.pretrain("pretrain_no_pta", ("train.loss_weights.pta=0.0",))
        self.selector_ablation(model, no_pta)
        self.pictures(model)
        self.report()
        return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    torch.manual_seed(0)
    return Demo(args, cfg).run()

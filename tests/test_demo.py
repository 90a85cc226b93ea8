"""``copa demo`` runs exactly what it records: every stage command goes through ``copa.cli.main``
with the argument list the report lists, every recorded line parses with the real parser, and the
new stage options (``pta-eval``, ``evaluate --selector/--selectors-from``) give the numbers of the
library calls they replace."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch

from copa import cli
from copa.assets import STEM_TINY
from copa.config import load_config
from copa.demo import FULL, QUICK, Demo, with_finetune_steps
from copa.errors import UserError
from tests.conftest import MICRO, TRAIN_MICRO


def _fake_outputs(args: argparse.Namespace) -> None:
    """The files each stage command writes that the demo reads, with placeholder numbers."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = args.command
    if cmd == "pretrain":
        cfg = load_config(args.config, args.overrides)
        summary = {
            "steps": cfg.train.steps,
            "stopped_early": False,
            "wall_s": 1.0,
            "precision": "float32",
            "final_val": {"itc_r1": 0.5},
        }
        (out / "summary.json").write_text(json.dumps(summary))
    elif cmd == "pta-stage":
        summary = {
            "steps": args.steps,
            "boxed_images": 12,
            "first_loss": 1.0,
            "last_loss": 0.1,
            "wall_s": 1.0,
            "val_before": {"recall_phrase": 0.3},
            "val_after": {"recall_phrase": 0.6},
        }
        (out / "summary.json").write_text(json.dumps(summary))
    elif cmd == "stem-stage":
        summary = {
            "saved": {"steps": 2000 if args.stem else args.steps, "images": 10000, "seed": 0},
            "steps": args.steps,
            "images": 40,
            "vocabulary": ["red", "star"],
            "first_loss": 3.0,
            "last_loss": 1.0,
            "wall_s": 1.0,
            "val": {
                "objects": 9.0,
                "phrase_accuracy": 0.5,
                "word_recall": 0.8,
                "phrase_accuracy_majority": 0.1,
            },
        }
        (out / "summary.json").write_text(json.dumps(summary))
    elif cmd == "pta-eval":
        (out / "pta.json").write_text(json.dumps({"metrics": {"recall_phrase": 0.5, "recall_agnostic": 0.4}}))
    elif cmd == "finetune":
        cfg = load_config(args.config, args.overrides)
        (out / "summary.json").write_text(json.dumps({"steps": cfg.train.steps}))
    elif cmd == "evaluate":
        metrics = {
            "r_mean": 1.0,
            "accuracy": 2.0,
            "cider": 3.0,
            "acc@0.5": 4.0,
            "samples_per_s": 5.0,
            "blind_accuracy": 1.5,
        }
        (out / "metrics.json").write_text(json.dumps(metrics))
        units = [{"unit": float(i % 2), "group": i // 3} for i in range(6)]
        (out / "predictions.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    elif cmd == "bench":
        keeps = ["none", *args.keep]
        rec = {
            "flops_ratio": 1.0,
            "speedup_vit": 1.0,
            "speedup_e2e": 1.0,
            "efficiency": 1.0,
            "pairs_per_s": 8.0,
            "images_per_s": 16.0,
        }
        bench = {
            "results": [{"keep": k, **rec} for k in keeps],
            "batch": args.batch,
            "runs": args.runs,
            "hardware": {"cpu": "test cpu", "torch_threads": 2, "torch": "x"},
        }
        (out / "bench.json").write_text(json.dumps(bench))


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_demo_records_exactly_the_argv_it_runs(quick, tmp_path, monkeypatch):
    """Every stage runs through cli.main; the recorded commands are those argument lists, in order, each
    parses with the real parser to the command the demo meant, and its config loads (strict --set)."""
    ran: list[list[str]] = []
    parser = cli.build_parser()

    def fake_main(argv: list[str]) -> int:
        ran.append(list(argv))
        args = parser.parse_args(argv)
        load_config(args.config, args.overrides)  # every --set names a real field
        _fake_outputs(args)
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(Demo, "pictures", lambda self, model_dir: None)  # reads a real model: library call
    # the quick run also fine-tunes VQA for another number of steps than its plan's, and warms up the
    # image stem itself instead of loading the shipped one
    changed = ["vqa=7"] if quick else []
    args = argparse.Namespace(
        quick=quick,
        out=str(tmp_path / "demo"),
        overrides=[],
        config=None,
        verbose=False,
        finetune_steps=changed,
        train_stem=quick,
    )
    assert Demo(args, load_config(None, [])).run() == 0

    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["commands"] == [shlex.join(["copa", *a]) for a in ran]
    assert len({tuple(a) for a in ran}) == len(ran)  # nothing ran twice
    for line in res["commands"]:
        words = shlex.split(line)
        assert words[0] == "copa"
        assert parser.parse_args(words[1:]).func is not None
    assert (tmp_path / "demo" / "report.md").exists()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert all(line in report for line in res["commands"])
    for rows in res["tasks"].values():  # each target's value with its interval over resampled images
        pruned = next(r for setting, r in rows.items() if setting.startswith("pruned"))
        assert pruned["interval"] == pytest.approx([1 / 3, 2 / 3])  # the fake images' means: 1/3, 2/3
        assert "interval" not in rows["unpruned (keep 1.0)"]
    assert ("| VQA accuracy (%) | 2.000 [0.333, 0.667] |" in report) is not quick

    plan = with_finetune_steps(QUICK if quick else FULL, changed)[0]
    plan = dataclasses.replace(plan, stem_from=None) if quick else plan
    assert res["finetune_steps"] == plan.finetune_steps
    assert res["finetune_steps_changed"] == ({"vqa": 7} if quick else {})
    assert ("Not the default plan: vqa fine-tuned for 7 steps" in report) is quick
    by_cmd: dict[str, list[argparse.Namespace]] = {}
    for a in ran:
        ns = parser.parse_args(a)
        by_cmd.setdefault(ns.command, []).append(ns)
    assert len(by_cmd["pretrain"]) == 1 and len(by_cmd["finetune"]) == 4
    # the trunk starts from the stem warmed up on another seed's labelled objects: shipped with COPA
    # (loaded and measured, 0 steps), or with --train-stem trained in the run on a new auxiliary set
    (stem,) = by_cmd["stem-stage"]
    demo_dir = tmp_path / "demo"
    assert by_cmd["pretrain"][0].init == str(demo_dir / "stem" / "model")
    synth = {ns.out: ns for ns in by_cmd["data"]}
    main = synth[str(demo_dir / "data")]
    assert res["stem"]["val"]["phrase_accuracy"] == 0.5 and res["stem_trained_here"] is quick
    assert ("`copa demo --train-stem`" in report) is quick
    if quick:
        assert (stem.steps, stem.batch, stem.stem) == (plan.stem_steps, plan.batch_size, None)
        assert stem.records == str(demo_dir / "data_aux" / "train_all_boxes.json")
        aux = synth[str(demo_dir / "data_aux")]
        assert (aux.n_train, aux.n_val, aux.n_test) == (plan.n_aux, 0, 0) and aux.seed != main.seed
        assert "was first warmed up for" in report
    else:
        assert plan.stem_from == str(STEM_TINY) and STEM_TINY.is_file()
        assert (stem.steps, stem.records, stem.stem) == (0, None, plan.stem_from)
        assert str(demo_dir / "data_aux") not in synth
        assert res["stem"]["from"] == plan.stem_from and res["stem"]["steps"] == 2000
        assert "the warm start shipped with COPA (`stem_tiny.safetensors`" in report
    cfg = load_config(by_cmd["pretrain"][0].config, by_cmd["pretrain"][0].overrides)
    # the trunk is ITC alone
    assert {k for k, w in cfg.train.loss_weights.items() if w} == {"itc"}
    assert cfg.train.steps == plan.pretrain_steps and cfg.eval.itm_topk == plan.itm_topk
    assert cfg.train.time_budget_s == pytest.approx(
        plan.safety_factor * plan.planned_step_s * plan.pretrain_steps
    )
    for ns in by_cmd["finetune"]:
        ft = load_config(ns.config, ns.overrides)
        assert ft.train.steps == plan.finetune_steps[ns.task]
        assert ns.meteor is (False if quick else None) and ns.eval_split == "none"
        assert ft.train.freeze_vit  # the pre-trained ViT is not fine-tuned (BENCHMARKS.md)
        assert ft.train.lr_head == plan.finetune_lr_head and ft.train.feature_cache_mb > 0
        assert ft.train.lr == plan.finetune_lr_task.get(ns.task, plan.finetune_lr)
        # the tasks in finetune_unpruned (none by default) train on every patch, the others through
        # COPA's selection; VQA's fusion reads the TPD's relevance
        assert (ft.model.select.keep_ratios == [1.0]) is (ns.task in plan.finetune_unpruned)
        assert ft.train.fusion_relevance is (ns.task in plan.fusion_relevance)
        assert ft.train.relevance_token is (ns.task in plan.relevance_token)
        assert ft.train.tune_vit_suffix is (ns.task in plan.tune_vit_suffix)
        assert ft.train.box_relevance is (ns.task in plan.box_relevance)
        # VQA and grounding start from the fine-tuned captioner, the others from COPA's pre-training
        source = plan.finetune_from.get(ns.task)
        expected = demo_dir / "tasks" / source / "model" if source else demo_dir / "pta_copa" / "model"
        assert ns.init == str(expected)
    order = [ns.task for ns in by_cmd["finetune"]]
    assert all(order.index(src) < order.index(t) for t, src in plan.finetune_from.items())
    assert res["finetune_from"] == plan.finetune_from == {"vqa": "caption", "grounding": "caption"}
    assert "vqa starts from the fine-tuned caption model" in report
    assert "grounding starts from the fine-tuned caption model" in report
    # the evaluations reuse each test image's ViT prefix across its questions
    ev = by_cmd["evaluate"][0]
    assert load_config(ev.config, ev.overrides).eval.feature_cache_mb == plan.eval_feature_cache_mb > 0
    assert res["eval_feature_cache_mb"] == plan.eval_feature_cache_mb
    # ... and every task's "pruned" evaluation still runs at the recommended keep ratio
    pruned = {ns.task for ns in by_cmd["evaluate"] if str(ns.out).endswith("test_pruned")}
    assert pruned == set(plan.finetune_steps)
    assert all(ns.keep_ratio < 1.0 for ns in by_cmd["evaluate"] if str(ns.out).endswith("test_pruned"))
    # the unpruned captions are compared by CIDEr: no METEOR run for them
    cap = {Path(ns.out).name: ns.meteor for ns in by_cmd["evaluate"] if ns.task == "caption"}
    assert cap == {"test_pruned": None, "test_unpruned": False}
    assert res["finetune_unpruned"] == list(plan.finetune_unpruned)
    assert ("fine-tuned on every patch" in report) is bool(plan.finetune_unpruned)
    assert res["fusion_relevance"] == list(plan.fusion_relevance) == ["vqa"]
    assert res["relevance_token"] == list(plan.relevance_token)
    assert res["box_relevance"] == list(plan.box_relevance) == ["grounding"]
    assert "the box head's score of each kept patch" in report
    assert "by the model's own TPD" in report
    assert ("(`train.relevance_token`)" in report) is bool(plan.relevance_token)
    assert res["tune_vit_suffix"] == list(plan.tune_vit_suffix)
    assert ("(`train.tune_vit_suffix`)" in report) is bool(plan.tune_vit_suffix)
    # evaluations read the same data and settings as the fine-tuning (the old record lacked them)
    # (the second scene style's VQA evaluation reads its own test split, with the blind control)
    alt = [ns for ns in by_cmd["evaluate"] if any("data_alt/test.json" in o for o in ns.overrides)]
    assert [(ns.task, "eval.blind_control=true" in ns.overrides) for ns in alt] == [("vqa", True)] * 2
    # ... once as fine-tuned, once with the conv stem's statistics of other, unlabelled alt scenes
    adapt = by_cmd["adapt-stem"]
    assert [Path(ns.ckpt).parts[-2:] for ns in adapt] == [("pta_copa", "model"), ("vqa", "model")]
    for ns in adapt:
        cfg = load_config(ns.config, ns.overrides)
        assert cfg.data.train.endswith("data_alt_unlabelled/test.json") and ns.split == "train"
    demo = tmp_path / "demo"
    assert {str(ns.ckpt) for ns in alt} == {str(demo / "tasks" / "vqa" / "model"), str(adapt[1].out)}
    assert "copa adapt-stem" in report and res["other_style"]["vqa_adapted"]
    for ns in by_cmd["evaluate"]:
        ev = load_config(ns.config, ns.overrides)
        assert ev.eval.itm_topk == plan.itm_topk
        assert ev.data.test.endswith("data_alt/test.json" if ns in alt else "data/test.json")
    blind = [ns for ns in by_cmd["evaluate"] if "eval.blind_control=true" in ns.overrides and ns not in alt]
    assert [(ns.task, ns.keep_ratio < 1.0) for ns in blind] == [("vqa", True)]
    swaps = {(ns.task, ns.selector or "", bool(ns.selectors_from)) for ns in by_cmd["evaluate"]}
    assert ("vqa", "tome", False) in swaps and ("grounding", "random", False) in swaps
    assert (("grounding", "", True) in swaps) is (not quick)  # the other pre-training rows' selectors
    # grounding's and VQA's selectors swap again at the tighter keep ratio, columns of the ablation
    # table: the parameter-free selector within reach of COPA (cls_attn), not those far behind it
    assert set(plan.tight_ablation) == {"grounding", "vqa"}
    for task, tight in plan.tight_ablation.items():
        at_tight = {ns.selector for ns in by_cmd["evaluate"] if ns.task == task and ns.keep_ratio == tight}
        assert set(plan.tight_selectors) <= at_tight and not {"random", "tome"} & at_tight, (task, at_tight)
        label = "VQA acc (%)" if task == "vqa" else "grounding acc@0.5 (%)"
        assert f"{label} at keep {tight}" in report
    assert res["ablation_tight_keep"] == plan.tight_ablation
    (bench,) = by_cmd["bench"]
    assert (bench.precision, bench.warmup, bench.device, bench.batch) == ("fp32", 1, "cpu", 8)
    assert len(by_cmd["pta-stage"]) == (1 if quick else 2)
    assert sorted(res["pta_vs_keep"], key=float) == [str(k) for k in plan.keep_sweep]


def test_failed_stage_command_stops_the_demo(tmp_path, monkeypatch):
    from copa.errors import UserError

    monkeypatch.setattr(cli, "main", lambda argv: 2)
    args = argparse.Namespace(quick=True, out=str(tmp_path), overrides=[], config=None, verbose=False)
    with pytest.raises(UserError, match="copa data synth"):
        Demo(args, load_config(None, [])).run()


def _sets(synth_dir: Path, *extra: str) -> list[str]:
    sets = [
        *MICRO,
        *TRAIN_MICRO,
        "eval.batch_size=8",
        f"data.train={synth_dir}/train.json",
        f"data.val={synth_dir}/val.json",
        f"data.test={synth_dir}/test.json",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def test_pta_eval_command_equals_the_library_call(micro_ckpt, synth_dir, tmp_path):
    from copa.evaluation import pta_eval, with_selector
    from copa.model.copa import load

    sets = _sets(synth_dir)
    for selector in (None, "tome"):
        out = tmp_path / str(selector)
        argv = [
            "pta-eval",
            *sets,
            "--ckpt",
            str(micro_ckpt),
            "--split",
            "test",
            "--keep-ratio",
            "0.5",
            "--max-images",
            "6",
            *(["--selector", selector] if selector else []),
            "--out",
            str(out),
        ]
        assert cli.main(argv) == 0
        got = json.loads((out / "pta.json").read_text())
        model = load(micro_ckpt)
        cfg = load_config(None, [s for s in sets if s != "--set"])
        want = pta_eval(with_selector(model, selector) if selector else model, cfg, "test", 0.5, 6)
        assert got["metrics"] == pytest.approx(want)
        assert got["selector"] == (selector or "tpd") and got["keep_ratio"] == 0.5


def test_evaluate_with_swapped_selectors_equals_the_library_call(micro_ckpt, synth_dir, tmp_path):
    from copa.evaluation import with_selector, with_selectors_of
    from copa.model.copa import load
    from copa.tasks.finetune import run_evaluation
    from copa.tasks.registry import make_task

    sets = _sets(synth_dir)
    cfg = load_config(None, [s for s in sets if s != "--set"])
    for flags in (["--selector", "random"], ["--selectors-from", str(micro_ckpt)]):
        out = tmp_path / flags[0].strip("-")
        argv = [
            "evaluate",
            "grounding",
            *sets,
            "--ckpt",
            str(micro_ckpt),
            "--keep-ratio",
            "0.5",
            *flags,
            "--out",
            str(out),
        ]
        assert cli.main(argv) == 0
        got = json.loads((out / "metrics.json").read_text())
        model = load(micro_ckpt)
        view = (
            with_selector(model, "random")
            if flags[0] == "--selector"
            else with_selectors_of(model, load(micro_ckpt))
        )
        want = run_evaluation(make_task("grounding"), view, cfg, "test", None, 0.5).metrics
        for k in ("acc@0.5", "miou", "keep_ratio"):
            assert got[k] == pytest.approx(want[k])
    both = [
        "evaluate",
        "grounding",
        *sets,
        "--ckpt",
        str(micro_ckpt),
        "--selector",
        "tome",
        "--selectors-from",
        str(micro_ckpt),
        "--out",
        str(tmp_path / "x"),
    ]
    assert cli.main(both) == 2


def test_selectors_from_another_row_ignore_keep_ratios_not_shapes():
    """A head fine-tuned unpruned (keep 1.0) evaluates with a pruned row's selectors; selectors of
    another shape are refused."""
    from copa.evaluation import with_selectors_of
    from copa.model.copa import COPAModel
    from tests.conftest import micro_config

    torch.manual_seed(0)
    unpruned = COPAModel(micro_config("model.select.keep_ratios=[1.0]").model).eval()
    donor = COPAModel(micro_config().model).eval()
    view = with_selectors_of(unpruned, donor)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            view.selectors_copy().state_dict().values(),
            donor.selectors_copy().state_dict().values(),
            strict=True,
        )
    )
    other = COPAModel(micro_config("model.select.tpd_hidden=16").model).eval()
    with pytest.raises(ValueError, match="selection configs differ"):
        with_selectors_of(unpruned, other)


def test_finetune_steps_replace_the_plans_and_bad_ones_are_user_errors():
    plan, changes = with_finetune_steps(FULL, ["vqa=640", "grounding=10"])
    assert changes == {"vqa": 640, "grounding": 10}
    assert plan.finetune_steps == {**FULL.finetune_steps, "vqa": 640, "grounding": 10}
    assert FULL.finetune_steps["vqa"] != 640  # the shared plan is not changed
    assert with_finetune_steps(FULL, [])[0] == FULL
    for bad in ("vqa", "vqa=0", "vqa=-3", "vqa=many", "ocr=5"):
        with pytest.raises(UserError, match="--finetune-steps"):
            with_finetune_steps(FULL, [bad])


def test_the_demo_loads_the_shipped_stem_unless_told_to_train_one(tmp_path):
    parser = cli.build_parser()
    for argv, shipped in ((["demo"], True), (["demo", "--train-stem"], False)):
        args = parser.parse_args([*argv, "--out", str(tmp_path / "d")])
        demo = Demo(args, load_config(None, []))
        assert demo.plan.stem_from == (str(STEM_TINY) if shipped else None)
        assert demo.results["stem_trained_here"] is not shipped
    assert FULL.stem_from == str(STEM_TINY)  # the shared plan is not changed


def test_metric_interval_resamples_whole_images(tmp_path):
    from copa.demo import metric_interval

    # image a: units 0, 0 (mean 0); image b: one unit of weight 3 (a query that counts three times)
    preds = [
        {"unit": 0.0, "group": "a"},
        {"unit": 0.0, "group": "a"},
        {"unit": 100.0, "group": "b", "unit_weight": 3.0},
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    iv = metric_interval(tmp_path)
    assert iv["value"] == pytest.approx(60.0) and iv["groups"] == 2
    assert iv["low"] == pytest.approx(0.0) and iv["high"] == pytest.approx(100.0)
    (tmp_path / "predictions.jsonl").write_text("")
    with pytest.raises(UserError, match="no predictions"):
        metric_interval(tmp_path)

"""Downstream tasks on the micro model and the synthetic scenes: each task's loss falls on a fixed
batch, ``copa finetune`` + ``copa evaluate`` write valid metrics.json files, the shared-prefix ITM
re-ranking equals full per-pair forwards, fine-tuning at a higher resolution resizes the position
table consistently."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from copa.cli import main
from copa.model.copa import COPAModel
from copa.tasks.registry import TASK_NAMES, make_task
from copa.train.trainer import make_loader
from tests.conftest import MICRO, TRAIN_MICRO, micro_config, train_config

EVAL_SETS = ["eval.batch_size=8", "eval.itm_topk=4", "eval.max_new_tokens=4", "eval.beam_size=2"]

COMMON_KEYS = {
    "task",
    "split",
    "keep_ratio",
    "pruning",
    "samples_per_s",
    "model_time_s",
    "num_samples",
    "precision",
}
TASK_KEYS = {
    "retrieval": {
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "r_mean",
        "itc_r_mean",
        "baseline_r_mean",
        "baseline_i2t_r1",
        "baseline_t2i_r1",
        "itm_pairs",
    },
    "vqa": {"accuracy", "baseline_accuracy", "baseline_majority_answer", "decode"},
    "caption": {"bleu4", "cider", "rouge_l", "baseline_bleu4", "baseline_cider", "decode"},
    "grounding": {"acc@0.5", "miou", "baseline_acc@0.5", "baseline_miou"},
}


def _sets(synth_dir, *extra: str) -> list[str]:
    sets = [
        *MICRO,
        *TRAIN_MICRO,
        *EVAL_SETS,
        f"data.train={synth_dir}/train.json",
        f"data.val={synth_dir}/val.json",
        f"data.test={synth_dir}/test.json",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_falls_on_a_fixed_batch(name, micro_init, synth_dir):
    cfg = train_config(synth_dir)
    task = make_task(name)
    torch.manual_seed(0)
    model = COPAModel.from_pretrained(micro_init).train()
    batch = next(
        iter(make_loader(task.build_dataset(cfg, "train", True, 32, 8), cfg, train=True, batch_size=8))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # retrieval samples hard negatives: the same draw for first and last
        return task.loss(model, batch)["loss"]

    first = float(loss().detach())
    for _ in range(20):
        out = loss()
        assert torch.isfinite(out)
        out.backward()
        opt.step()
        opt.zero_grad()
    last = float(loss().detach())
    assert last < 0.9 * first, (name, first, last)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_cli_finetune_then_evaluate_writes_metrics(name, micro_init, synth_dir, tmp_path):
    sets = _sets(synth_dir, "train.steps=2")
    extra = ["--no-meteor"] if name == "caption" else []
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                name,
                "--config",
                "configs/tiny.yaml",
                *sets,
                *extra,
                "--init",
                str(micro_init),
                "--out",
                str(out),
                "--eval-split",
                "none",
            ]
        )
        == 0
    )
    assert (out / "model" / "model.safetensors").exists() and (out / "train_log.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["task"] == name
    vocab = json.loads((out / "model" / "config.json").read_text())["model"]["decoder"]["output_vocab"]
    if name in ("caption", "vqa"):  # train.output_vocab=targets: the training targets' tokens only
        assert 3 < len(vocab) < 200 and vocab == sorted(set(vocab))
    else:
        assert vocab == []
    assert (
        main(
            [
                "evaluate",
                name,
                "--config",
                "configs/tiny.yaml",
                *sets,
                *extra,
                "--ckpt",
                str(out / "model"),
                "--split",
                "test",
                "--out",
                str(tmp_path / "test"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert COMMON_KEYS | TASK_KEYS[name] <= set(metrics), (COMMON_KEYS | TASK_KEYS[name]) - set(metrics)
    assert metrics["keep_ratio"] == 0.5 and metrics["pruning"] is True and metrics["samples_per_s"] > 0
    lines = (tmp_path / "test" / "predictions.jsonl").read_text().splitlines()
    assert lines and all(isinstance(json.loads(x), dict) for x in lines)
    # each prediction's share of the headline metric (the demo's paired bootstrap reads these)
    preds = [json.loads(x) for x in lines]
    weights = [p.get("unit_weight", 1.0) for p in preds]
    mean = sum(p["unit"] * w for p, w in zip(preds, weights, strict=True)) / sum(weights)
    headline = {"retrieval": "r_mean", "vqa": "accuracy", "caption": "cider", "grounding": "acc@0.5"}[name]
    assert mean == pytest.approx(metrics[headline], abs=1e-4) and all("group" in p for p in preds)
    if name == "caption":
        assert "meteor" not in metrics and (tmp_path / "test" / "captions_coco_results.json").exists()
        assert metrics["baseline_cider"] == 0.0
        tok = COPAModel.from_pretrained(out / "model").tokenizer
        written = {i for p in preds for i in tok(p["caption"], add_special_tokens=False)["input_ids"]}
        assert written <= set(vocab), written - set(vocab)


def test_finetune_evaluates_and_keep_ratio_flag(micro_init, synth_dir, tmp_path):
    """Default finetune evaluates on val into OUT; --keep-ratio 1.0 evaluates unpruned."""
    sets = _sets(synth_dir, "train.steps=1")
    out = tmp_path / "g"
    assert (
        main(
            [
                "finetune",
                "grounding",
                "--config",
                "configs/tiny.yaml",
                *sets,
                "--init",
                str(micro_init),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    val = json.loads((out / "metrics.json").read_text())
    assert val["split"] == "val" and val["keep_ratio"] == 0.5
    assert (
        main(
            [
                "evaluate",
                "grounding",
                "--config",
                "configs/tiny.yaml",
                *sets,
                "--ckpt",
                str(out / "model"),
                "--keep-ratio",
                "1.0",
                "--split",
                "val",
                "--out",
                str(tmp_path / "full"),
            ]
        )
        == 0
    )
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert full["keep_ratio"] == 1.0 and full["pruning"] is False
    assert full["num_samples"] == val["num_samples"]


def test_shared_prefix_itm_equals_full_pairs():
    from copa.tasks.retrieval import itm_scores_shared_prefix

    torch.manual_seed(0)
    # the pretrained MiniLM text encoder: random micro text states are too alike to steer selection
    cfg = micro_config(
        "model.text.pretrained=minilm",
        "model.text.width=384",
        "model.text.heads=12",
        "model.text.intermediate=1536",
        "model.text.layers=6",
        "model.fusion.heads=12",
        "model.decoder.heads=12",
    )
    model = COPAModel(cfg.model).eval()
    with torch.no_grad():  # a text-sensitive TPD, so each text really selects its own patches
        model.vision.selectors[0].fc_text.weight.mul_(50)
    texts = [
        "a red circle",
        "two blue squares on the left",
        "a star",
        "a green triangle above a circle",
        "yes",
    ]
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    images = torch.randn(3, 3, 32, 32)
    pi = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    pt = torch.tensor([0, 1, 2, 1, 3, 0, 2, 3, 4, 4])
    with torch.no_grad():
        shared = itm_scores_shared_prefix(model, images, ids, mask, pi, pt, batch_size=4)
        logits = model.itm_logits(model(images[pi], ids[pt], mask[pt]))
        query = model.text_query(model.text_states(ids[pt], mask[pt]), mask[pt])
        kept = model.image_tokens(model.image_prefix(images[pi]), query).kept
    full = logits[:, 1] - logits[:, 0]
    assert shared.shape == (10,)
    assert torch.allclose(shared, full, atol=1e-5), (shared - full).abs().max()
    # selection is text-aware: image 0 keeps different patches for different texts
    kept0 = {tuple(kept[j].sort().values.tolist()) for j in range(10) if pi[j] == 0}
    assert len(kept0) > 1


def _per_pair_itm(model, images, ids, mask, pairs):
    """The straightforward reference: one full forward per (image, text) pair -> (P,) log-odds."""
    out = []
    with torch.no_grad():
        for i, t in pairs.tolist():
            logits = model.itm_logits(model(images[i : i + 1], ids[t : t + 1], mask[t : t + 1]))
            out.append(float(logits[0, 1] - logits[0, 0]))
    return torch.tensor(out)


@pytest.mark.parametrize("reuse", [True, False])
def test_itm_batched_across_queries_equals_per_pair(reuse):
    from copa.tasks.retrieval import itm_scores_batched

    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    with torch.no_grad():  # a text-sensitive TPD, so each text really selects its own patches
        model.vision.selectors[0].fc_text.weight.mul_(50)
    images = torch.randn(5, 3, 32, 32)
    ids = torch.randint(1000, model.cfg.text.vocab_size, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding, as a tokenized gallery has
    pairs = torch.tensor(
        [
            [0, 0],
            [0, 1],
            [0, 3],
            [1, 0],
            [1, 2],
            [2, 0],
            [2, 1],
            [2, 2],
            [2, 3],
            [3, 1],
            [3, 2],
            [4, 0],
            [4, 3],
        ]
    )
    pairs = pairs[torch.randperm(pairs.shape[0])]  # any order: the result follows ``pairs``
    chunks = [([3, 0], images[[3, 0]]), ([1], images[[1]]), ([4, 2], images[[4, 2]])]  # uneven chunks
    calls: list[str] = []

    def region(name):
        calls.append(name)
        return contextlib.nullcontext()

    scores = itm_scores_batched(
        model, chunks, pairs, ids, mask, batch_size=3, reuse_prefix=reuse, region=region
    )
    expected = _per_pair_itm(model, images, ids, mask, pairs)
    assert scores.shape == (pairs.shape[0],) and not scores.isnan().any()
    assert torch.allclose(scores, expected, atol=1e-5), (scores - expected).abs().max()
    n_texts = pairs[:, 1].unique().numel()
    assert calls.count("text") == -(-n_texts // 3)  # every distinct text once, in batches
    forwards = -(-pairs.shape[0] // 3)  # full batches across chunk (query) boundaries, one remainder
    assert calls.count("prefix") == (len(chunks) if reuse else forwards)


def test_stage2_equals_per_pair(micro_init, synth_dir):
    """The evaluation's re-rank (image chunks from the loader, pairs batched across them) scores every
    candidate pair as a full per-pair forward does."""
    from copa.tasks.base import EvalEnv, Stopwatch
    from copa.tasks.retrieval import rerank_candidates

    cfg = train_config(synth_dir, "eval.batch_size=3")
    task = make_task("retrieval")
    model = COPAModel.from_pretrained(micro_init).eval()
    data = task.build_dataset(cfg, "test", False, 32, 8)
    cpu = torch.device("cpu")
    env = EvalEnv(cfg, cpu, torch.float32, task.options, Stopwatch(cpu))
    ids, mask = env.collator(model).tokenize(data.texts)
    sim = torch.randn(data.num_images, len(data.texts), generator=torch.Generator().manual_seed(0))
    pairs = rerank_candidates(sim, 3).pairs
    scores, seconds = task._stage2(model, data, ids, mask, pairs, env)
    images = torch.stack([data.dataset[r]["image"] for r in data.image_rows])
    expected = _per_pair_itm(model, images, ids, mask, pairs)
    assert seconds > 0 and torch.allclose(scores, expected, atol=1e-5), (scores - expected).abs().max()


def test_higher_resolution_resizes_position_table(micro_init, synth_dir, tmp_path):
    from copa.tasks.finetune import prepare_model

    cfg = train_config(synth_dir, "model.vision.image_size=48", "model.select.keep_ratios=[0.25]")
    model = prepare_model(cfg, micro_init)
    assert model.cfg.vision.image_size == 48 and model.vision.num_patches == 36
    assert model.vision.pos_embed.shape == (1, 37, 64) and model.vision.keep_ratios == [0.25]
    model.save_pretrained(tmp_path / "m")
    again = COPAModel.from_pretrained(tmp_path / "m").eval()
    assert again.cfg.vision.image_size == 48 and again.cfg.select.keep_ratios == [0.25]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.eval().encode_image(x))


def test_rank_candidates_layout_matches_one_by_one():
    from copa.tasks.generation import rank_candidates, token_logprobs, tokenize

    torch.manual_seed(0)
    model = COPAModel(micro_config().model).eval()
    ctx, cmask = torch.randn(2, 7, 64), torch.ones(2, 7, dtype=torch.long)
    cmask[1, 5:] = 0
    ids, mask = tokenize(model, ["red", "two blue", "a small green star"], torch.device("cpu"))
    with torch.no_grad():
        scores = rank_candidates(model, ctx, cmask, ids, mask, chunk=2)  # chunks of 2 + 1 candidates
        for i in range(2):
            for j in range(3):
                logp, _ = token_logprobs(
                    model, ctx[i : i + 1], cmask[i : i + 1], ids[j : j + 1], mask[j : j + 1]
                )
                assert scores[i, j].item() == pytest.approx(logp.sum().item(), abs=1e-4)


def test_vqa_answer_list_ranking_and_beam(micro_init, synth_dir):
    from copa.tasks.base import TaskOptions
    from copa.tasks.finetune import run_evaluation
    from copa.tasks.vqa import load_answer_list

    cfg = train_config(synth_dir, *EVAL_SETS)
    model = COPAModel.from_pretrained(micro_init).eval()
    cands = load_answer_list("train", cfg)
    assert {"yes", "no"} <= set(cands) and len(cands) == len(set(cands))
    ranked = run_evaluation(make_task("vqa", TaskOptions(answer_list="train")), model, cfg, "val", None)
    assert ranked.metrics["decode"] == "rank"
    assert all(p["prediction"] in cands for p in ranked.predictions)
    beam = run_evaluation(
        make_task("vqa", TaskOptions(decode="beam")), model, cfg, "val", None, keep_ratio=1.0
    )
    assert beam.metrics["decode"] == "beam" and beam.metrics["keep_ratio"] == 1.0
    assert model.vision.keep_ratios == [0.5]  # the model's own ratio is restored after evaluation


def test_vqa_blind_control_answers_with_another_image(micro_init, synth_dir):
    from copa.tasks.base import TaskOptions
    from copa.tasks.finetune import run_evaluation

    cfg = train_config(synth_dir, *EVAL_SETS, "eval.blind_control=true")
    model = COPAModel.from_pretrained(micro_init).eval()
    task = make_task("vqa", TaskOptions(answer_list="train"))
    res = run_evaluation(task, model, cfg, "val", None)
    m = res.metrics
    blind = [p for p in res.predictions if "blind_score" in p]
    assert m["blind_questions"] == len(blind) > len(res.predictions) // 2
    assert m["blind_accuracy"] == pytest.approx(100.0 * sum(p["blind_score"] for p in blind) / len(blind))

    class Blindfold(torch.nn.Module):  # the fusion sees no image at all: both passes must agree
        def forward(self, img):
            return torch.zeros(*img.shape[:2], cfg.model.text.width)

    model.fusion.img_proj = Blindfold()
    m = run_evaluation(task, model, cfg, "val", None).metrics
    assert m["blind_accuracy"] == pytest.approx(m["accuracy_on_blind_questions"])


def test_eval_every_writes_a_learning_curve_and_trains_the_same_weights(micro_init, synth_dir, tmp_path):
    """``train.eval_every``: a curve row per evaluation (the last one after training) and the same
    weights as a run without it: the evaluations take no randomness from training."""
    from safetensors.torch import load_file

    def run(out: Path, *extra: str) -> None:
        sets = _sets(synth_dir, "train.steps=3", *extra)
        argv = ["finetune", "grounding", "--config", "configs/tiny.yaml", *sets, "--init", str(micro_init)]
        assert main([*argv, "--eval-split", "val", "--out", str(out)]) == 0

    run(tmp_path / "plain")
    run(tmp_path / "curve", "train.eval_every=2")
    rows = [json.loads(x) for x in (tmp_path / "curve" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and all("acc@0.5" in r for r in rows)
    assert not (tmp_path / "plain" / "curve.jsonl").exists()
    a = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "curve" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("selector", [None, "false"])
def test_freeze_vit_finetune_keeps_the_backbone_and_trains_the_rest(
    micro_init, synth_dir, tmp_path, selector
):
    """``train.freeze_vit``: the ViT backbone leaves fine-tuning bit-identical, the fusion does not.
    The selectors (``train.freeze_selector``): by default a task fine-tune leaves them as PTA trained
    them; ``false`` lets the task loss move them."""
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    extra = [] if selector is None else [f"train.freeze_selector={selector}"]
    sets = _sets(synth_dir, "train.steps=2", "train.freeze_vit=true", *extra)
    assert (
        main(
            [
                "finetune",
                "vqa",
                "--config",
                "configs/tiny.yaml",
                *sets,
                "--init",
                str(micro_init),
                "--eval-split",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    before, after = (
        load_file(str(micro_init / "model.safetensors")),
        load_file(str(out / "model" / "model.safetensors")),
    )
    vit = [k for k in before if k.startswith("vision.") and not k.startswith("vision.selectors")]
    assert vit and all(torch.equal(before[k], after[k]) for k in vit)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fusion."))
    sel = [k for k in before if k.startswith("vision.selectors.")]
    assert sel and all(torch.equal(before[k], after[k]) for k in sel) is (selector is None)
    model = COPAModel(micro_config().model)
    model.freeze(vit=True)
    assert all(p.requires_grad for p in model.vision.selectors.parameters())
    assert not any(
        p.requires_grad for n, p in model.vision.named_parameters() if not n.startswith("selectors.")
    )
    model.freeze(selector=True)
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_warm_up_runs_once_per_process_for_the_same_shapes(monkeypatch):
    """An evaluation's warm-up pays first-call costs; a later evaluation of the same shapes (the demo's
    ablation rows) finds them paid, another keep ratio warms up again."""
    from copa.tasks import base

    monkeypatch.setattr(base, "_WARMED", set())
    cfg = micro_config()
    model = COPAModel(cfg.model).eval()
    env = base.EvalEnv(
        cfg, torch.device("cpu"), torch.float32, make_task("vqa").options, base.Stopwatch(torch.device("cpu"))
    )
    calls: list[int] = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: calls.append(x.shape[0]) or encode(x))
    base.warm_up(model, env)
    base.warm_up(model, env)
    assert len(calls) == cfg.eval.warmup_runs > 0
    model.set_keep_ratio(1.0)
    base.warm_up(model, env)
    assert len(calls) == 2 * cfg.eval.warmup_runs
    base.warm_up(model, env, runs=0)  # nothing asked: nothing run, nothing marked
    assert len(calls) == 2 * cfg.eval.warmup_runs


def test_vqa_split_answers_are_read_again_when_the_file_changes(tmp_path):
    from copa.tasks.vqa import split_answers

    path = tmp_path / "train.json"
    cfg = micro_config(f"data.train={path}")
    record = {"image": "a.png", "questions": [{"q": "is there a star?", "answers": ["yes"]}]}
    path.write_text(json.dumps([record]))
    assert split_answers(cfg, "train") == [["yes"]] == split_answers(cfg, "train")
    record["questions"].append({"q": "how many objects are there?", "answers": ["3", "4"]})
    path.write_text(json.dumps([record]))
    assert split_answers(cfg, "train") == [["yes"], ["3", "4"]]
    path.unlink()
    assert split_answers(cfg, "train") is None


def test_vqa_accuracy_by_question_type_beside_each_types_majority(micro_init, synth_dir):
    from copa.data.records import QA
    from copa.tasks.finetune import run_evaluation
    from copa.tasks.metrics import accuracy_by_type
    from copa.tasks.vqa import question_type

    assert question_type(QA("Is the red star left of it?", ["no"])) == "is the"
    assert question_type(QA("is the red star left of it?", ["no"], "relation")) == "relation"
    assert question_type(QA("¿Qué color tiene?", ["rojo"])) == "qué color"
    preds = [
        {"type": "count", "score": 1.0, "answers": ["2"]},
        {"type": "count", "score": 0.0, "answers": ["3"]},
        {"type": "color", "score": 0.0, "answers": ["red"]},
    ]
    by = accuracy_by_type(preds, [("count", ["3"]), ("count", ["3"]), ("count", ["2"])])
    assert by["count"] == {
        "questions": 2,
        "accuracy": 50.0,
        "majority_answer": "3",
        "majority_accuracy": 50.0,
    }
    # no reference question of the type: its majority comes from the scored questions
    assert by["color"]["majority_answer"] == "red" and by["color"]["majority_accuracy"] == 100.0

    cfg = train_config(synth_dir, *EVAL_SETS)
    res = run_evaluation(make_task("vqa"), COPAModel.from_pretrained(micro_init).eval(), cfg, "val", None)
    by = res.metrics["by_type"]
    assert set(by) <= {"count", "color", "shape", "exists", "side", "relation"} and "count" in by
    assert sum(v["questions"] for v in by.values()) == len(res.predictions)
    counted = [p for p in res.predictions if p["type"] == "count"]
    assert by["count"]["accuracy"] == pytest.approx(100.0 * sum(p["score"] for p in counted) / len(counted))


def test_warm_up_leaves_a_random_selectors_draws_to_the_evaluation(monkeypatch):
    from copa.evaluation import with_selector
    from copa.tasks import base

    monkeypatch.setattr(base, "_WARMED", set())
    cfg = micro_config()
    torch.manual_seed(0)
    model = COPAModel(cfg.model).eval()
    env = base.EvalEnv(
        cfg, torch.device("cpu"), torch.float32, make_task("vqa").options, base.Stopwatch(torch.device("cpu"))
    )
    images = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    ids = torch.randint(1, 100, (2, 5))

    def kept(warm: bool) -> torch.Tensor:
        view = with_selector(model, "random")
        if warm:
            base.warm_up(view, env)
        with torch.no_grad():
            return view(images, ids, torch.ones_like(ids)).vision.patch_index

    assert torch.equal(kept(True), kept(False))

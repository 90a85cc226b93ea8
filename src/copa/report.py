"""The demo report: ``report.md`` and an HTML twin built from the same blocks."""

from __future__ import annotations

import html
import math
import platform
from pathlib import Path
from typing import Any

import torch

# ("h2", text) | ("p", text) | ("alert", text: shown in red) | ("table", (header, rows))
# | ("img", (file, alt)) | ("code", text)
Block = tuple[str, Any]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}f}"
    return str(v)


def _get(d: dict[Any, Any], k: float) -> Any:
    """d[k] for a float key that a JSON round trip may have turned into a string."""
    for key, v in d.items():
        if float(key) == k:
            return v
    return None


def _stem_sentence(res: dict[str, Any]) -> str:
    stem = res.get("stem")
    if not stem:
        return ""
    if stem.get("from"):
        text = (
            f"The image stem is the warm start shipped with COPA (`{Path(stem['from']).name}`, written by "
            f"`make stem-asset`: {stem['steps']:,} steps naming the labelled objects of {stem['images']:,} "
            "images of an auxiliary synthetic set made with another seed, none of them a training, "
            "validation or test image), the miniature of the pretrained image encoder the paper starts from"
        )
    else:
        text = (
            f"The image stem was first warmed up for {stem['steps']} steps ({stem['wall_s']:.0f} s) naming "
            f"the labelled objects of {stem['aux_images']} images of an auxiliary synthetic set (seed "
            f"{stem['aux_seed']}: none of them a training, validation or test image), the miniature of "
            "the pretrained image encoder the paper starts from"
        )
    val = stem.get("val") or {}
    if val:
        text += (
            f"; on the {val['objects']:.0f} validation objects of this run it names every word of "
            f"{100 * val['phrase_accuracy']:.0f}% of the phrases (the most frequent words: "
            f"{100 * val['phrase_accuracy_majority']:.0f}%) and {100 * val['word_recall']:.0f}% of the words"
        )
    return text + ". "


def _pretrain_sentence(res: dict[str, Any]) -> str:
    pre = res["pretrain"]
    text = _stem_sentence(res) + (
        f"A trunk of {pre['steps']} steps ({pre['precision']}, {pre['wall_s']:.0f} s) of ITC against the "
        "frozen pretrained text encoder, shared by every "
        "pre-training row; then each row's PTA stage trains the selector alone (everything else frozen)"
    )
    stage = res.get("pta_copa")
    if stage:
        text += (
            f": COPA's for {stage['steps']} steps on the {stage['boxed_images']} training images that carry "
            f"boxes, {stage['wall_s']:.0f} s"
        )
        if stage.get("views"):
            text += (
                f" ({stage['views']} augmented views of each, their frozen ViT prefix and phrase text "
                f"computed once for {stage['distinct_batches']} batches and replayed)"
            )
    return text + (
        ". Every stage runs a fixed number of seeded steps: the numbers do not depend on how fast the "
        "machine is (another kind of CPU sums in another order and may flip a few predictions)."
    )


def _run_alerts(res: dict[str, Any]) -> list[Block]:
    """Red lines at the top for a run that is not the planned one: a stage its time budget stopped,
    fine-tuning steps changed by ``copa demo --finetune-steps``, or a stem trained in the run
    (``--train-stem``)."""
    out: list[Block] = []
    changed = res.get("finetune_steps_changed") or {}
    what = [f"{t} fine-tuned for {n} steps (`copa demo --finetune-steps`)" for t, n in changed.items()]
    if res.get("stem_trained_here"):
        what.append("the image stem warmed up in this run instead of loaded (`copa demo --train-stem`)")
    if what:
        out.append(
            (
                "alert",
                f"Not the default plan: {'; '.join(what)}; this run's numbers and time are not the default "
                "demo's.",
            )
        )
    hits = res.get("budget_hits", [])
    if hits:
        lines = ", ".join(f"{h['stage']} ({h['steps']} of {h['planned']} steps)" for h in hits)
        text = (
            "SAFETY NET HIT: these stages were stopped by their time budget, so this run's numbers are "
            f"not the planned ones and not comparable with other machines': {lines}."
        )
        out.append(("alert", text))
    return out


def _pta_blocks(res: dict[str, Any]) -> list[Block]:
    out: list[Block] = []
    pre = res.get("pretrain")
    if pre:
        v = {
            **pre["final_val"],
            **{f"pta_{k}": x for k, x in res.get("pta_copa", {}).get("val_after", {}).items()},
        }
        out += [
            ("h2", "Pre-training (tiny preset, synthetic scenes, PTA from ~5% boxed images)"),
            ("p", _pretrain_sentence(res)),
            (
                "table",
                (
                    ["metric (validation)", "value"],
                    [
                        [k, _fmt(v.get(k))]
                        for k in (
                            "pta_specificity@0.25",
                            "pta_specificity@0.5",
                            "pta_recall_phrase",
                            "pta_recall_agnostic",
                            "pta_recall_random",
                            "pta_ap_phrase",
                            "pta_ap_agnostic",
                            "val_itc",
                            "val_itm",
                            "val_mlm",
                            "val_prefix_lm",
                        )
                        if k in v
                    ],
                ),
            ),
        ]
        out.append(
            (
                "p",
                (
                    "Selection metrics after COPA's PTA stage, losses at the end of the trunk. Object-patch "
                    "recall = share of the patches under the queried object's box that survive "
                    f"selection at keep ratio {_fmt(v.get('pta_keep_ratio'), 2)}; random selection keeps "
                    f"{_fmt(v.get('pta_recall_random'), 2)} of them in expectation. Text "
                    "specificity = recall of "
                    "the queried object's patches minus recall of the other objects' patches of "
                    "the same image, "
                    "at keep 0.25 / 0.5: 0 for random selection and for any text-blind selector."
                ),
            )
        )
    pics = res.get("pictures", {})
    if "loss_curves" in pics:
        out += [("h3", "Loss curves"), ("img", (pics["loss_curves"], "loss curves"))]
    if "kept_patches" in pics:
        out += [
            ("h3", "Kept patches for two different texts"),
            (
                "p",
                (
                    "Each row: a test image, then the patches the model keeps (bright) for two "
                    "object phrases and "
                    "for the text-agnostic query."
                ),
            ),
            ("img", (pics["kept_patches"], "kept patches")),
        ]
    return out


TIGHT_LABELS = {"vqa": "VQA acc (%)", "grounding": "grounding acc@0.5 (%)"}


def _ablation_blocks(res: dict[str, Any]) -> list[Block]:
    ab = res.get("ablation_pta")
    if not ab:
        return []
    tasks = res.get("ablation_tasks", {})
    header = [
        "selector",
        "text specificity @0.25",
        "@0.5",
        "object-patch recall (phrase)",
        "recall (text-agnostic)",
        "AP (phrase)",
    ]
    tight = res.get("ablation_tight_keep", {})
    extra_cols = [
        ("vqa_metric", "VQA acc (%)"),
        ("grounding_metric", "grounding acc@0.5 (%)"),
        *[(f"{t}_tight_metric", f"{TIGHT_LABELS.get(t, t)} at keep {r}") for t, r in tight.items()],
        ("retrieval_metric", "retrieval mean R (%)"),
        ("vqa_sps", "VQA samples/s"),
    ]
    present = [c for c in extra_cols if any(c[0] in t for t in tasks.values())]
    header += [c[1] for c in present]
    rows = []
    for name, r in ab["rows"].items():
        t = tasks.get(name, {})
        rows.append(
            [
                name,
                _fmt(r.get("specificity@0.25")),
                _fmt(r.get("specificity@0.5")),
                _fmt(r.get("recall_phrase")),
                _fmt(r.get("recall_agnostic")),
                _fmt(r.get("ap_phrase")),
            ]
            + [_fmt(t.get(c[0])) for c in present]
        )
    note = (
        f"All rows at keep ratio {ab['keep_ratio']} except `none` (unpruned). Every row shares the "
        "weights of "
        "the one pre-training trunk and differs in the selector only: `random`, `tome` (ToMe-style "
        "merging to the "
        "same visual-token count; its recall counts patches that stay their own token), `cls_attn` "
        "(EViT-style) "
        "and `text_attn` (TRIPS-style) are parameter-free; `tpd without PTA` is the trunk's own "
        "TPD, COPA's was "
        "trained by PTA on the ~5% boxed images, the last row by PTA with boxes on every image. The task "
        "columns evaluate COPA's fine-tuned model with each row's selector swapped in. Random "
        "selection scores "
        "recall = keep ratio and specificity 0 in expectation. Throughput is VQA samples/s on the test split."
    )
    if res.get("eval_feature_cache_mb"):
        note += (
            " Each test image's ViT prefix is computed once for all its questions there "
            "(`eval.feature_cache_mb`); the benchmark section times the whole model per sample."
        )
    if tight:
        note += (
            " The `at keep` columns: the same swap at a tighter keep ratio, where a selector must choose "
            "between the objects, not just keep them all; only for the rows within reach of COPA at the "
            "recommended keep (a dash: not run there)."
        )
    out: list[Block] = [
        ("h2", "Ablation: selectors at the same keep ratio"),
        ("p", note),
        ("table", (header, rows)),
    ]
    copa_name = next((n for n in ab["rows"] if "COPA" in n), None)
    if copa_name:
        intervals = res.get("ablation_margins", {})

        def margin(a: Any, b: Any, col: str, row: str) -> str:
            ok = all(isinstance(v, (int, float)) and not math.isnan(v) for v in (a, b))
            if not ok:
                return "—"
            iv = intervals.get(col.removesuffix("_metric"), {}).get(row)
            return f"{a - b:+.3f}" + (f" [{iv['low']:+.1f}, {iv['high']:+.1f}]" if iv else "")

        mcols = [("specificity@0.25", "specificity @0.25")] + [c for c in present if c[0].endswith("_metric")]
        copa = {**ab["rows"][copa_name], **tasks.get(copa_name, {})}
        mrows = [
            [name] + [margin(copa.get(c), {**r, **tasks.get(name, {})}.get(c), c, name) for c, _ in mcols]
            for name, r in ab["rows"].items()
            if name != copa_name
        ]
        out += [
            ("h3", "COPA's margin over each row (COPA minus the row; > 0: COPA is better)"),
            ("table", (["row"] + [label for _, label in mcols], mrows)),
        ]
        if intervals:
            out.append(("p", _verdicts(intervals, tight)))
    sweep = res.get("pta_vs_keep")
    if sweep:
        out += [
            ("h3", "Object-patch recall vs keep ratio (TPD with PTA)"),
            (
                "table",
                (
                    ["keep ratio", "recall (phrase)", "recall (text-agnostic)", "random"],
                    [
                        [
                            k,
                            _fmt(v.get("recall_phrase")),
                            _fmt(v.get("recall_agnostic")),
                            _fmt(v.get("recall_random")),
                        ]
                        for k, v in sweep.items()
                    ],
                ),
            ),
        ]
    curves = res.get("task_vs_keep", {})
    if curves:
        keeps = sorted({float(k) for c in curves.values() for k in c})
        out += [
            ("h3", "Task accuracy vs keep ratio (same fine-tuned weights)"),
            (
                "table",
                (
                    ["task"] + [f"keep {k:g}" for k in keeps],
                    [[t] + [_fmt(_get(c, k)) for k in keeps] for t, c in curves.items()],
                ),
            ),
        ]
    pics = res.get("pictures", {})
    for key, title in (
        ("accuracy_vs_keep", "Accuracy vs keep ratio"),
        ("speed_vs_keep", "Speed vs keep ratio"),
    ):
        if key in pics:
            out += [("h3", title), ("img", (pics[key], title))]
    return out


def _by_type_blocks(tasks: dict[str, Any]) -> list[Block]:
    """VQA's accuracy per question type beside each type's majority answer, for every setting that
    has it: which kinds of question the model answers and which it only guesses."""
    settings = {s: m["by_type"] for s, m in tasks.get("vqa", {}).items() if m.get("by_type")}
    if not settings:
        return []
    first = next(iter(settings.values()))  # the question counts and majorities: the same in every setting
    rows = []
    for kind in sorted({k for by in settings.values() for k in by}):
        ref = first.get(kind, {})
        rows.append(
            [
                kind,
                str(ref.get("questions", "—")),
                *(_fmt(by.get(kind, {}).get("accuracy"), 1) for by in settings.values()),
                f'{_fmt(ref.get("majority_accuracy"), 1)} ("{ref.get("majority_answer", "")}")',
            ]
        )
    return [
        ("h3", "VQA by question type"),
        (
            "table",
            (["question type", "questions", *settings, "majority answer of the type"], rows),
        ),
        (
            "p",
            "Accuracy (%) on each type of test question; the last column always answers the type's most "
            "frequent training answer. A type near its majority is one the model has not learnt to read "
            "from the image.",
        ),
    ]


def _task_blocks(res: dict[str, Any]) -> list[Block]:
    tasks = res.get("tasks")
    if not tasks:
        return []
    rows, behind = [], []
    for task, by_keep in tasks.items():
        for setting, m in by_keep.items():
            value, base = m.get("metric"), m.get("baseline")
            margin = (
                value - base if isinstance(value, (int, float)) and isinstance(base, (int, float)) else None
            )
            if margin is not None and margin <= 0:
                behind.append(f"{task} ({setting})")
            rows.append(
                [
                    task,
                    setting,
                    m.get("metric_name", ""),
                    _fmt(value),
                    _fmt(base),
                    "—" if margin is None else f"{margin:+.3f}",
                    _fmt(m.get("blind")),
                    _fmt(m.get("samples_per_s"), 1),
                ]
            )
    out: list[Block] = [
        ("h2", "Downstream tasks: pruned vs unpruned"),
        (
            "table",
            (
                [
                    "task",
                    "setting",
                    "metric",
                    "value",
                    "trivial baseline",
                    "margin",
                    "with another image",
                    "samples/s",
                ],
                rows,
            ),
        ),
        (
            "p",
            (
                "`with another image`: VQA's questions answered with another test image (same model): "
                "what it scores without looking. Close to `value` means the model answers from the "
                "question alone. Each task fine-tunes its fusion and head through COPA's selection at "
                "the recommended keep ratio; the ViT and the selector stay as pre-training left them "
                "(`train.freeze_vit`, `train.freeze_selector`)."
            ),
        ),
    ]
    unpruned = [t for t in res.get("finetune_unpruned", []) if t in tasks]
    if unpruned:
        out.append(
            (
                "p",
                f"{', '.join(unpruned)}: the head was fine-tuned on every patch (keep 1.0) and is evaluated "
                "pruned with COPA's selector like the other tasks: it learns more from every patch than "
                "from the kept ones (`DemoPlan.finetune_unpruned`; BENCHMARKS.md).",
            )
        )
    chained = {t: src for t, src in res.get("finetune_from", {}).items() if t in tasks}
    if chained:
        out.append(
            (
                "p",
                "; ".join(f"{t} starts from the fine-tuned {src} model" for t, src in chained.items())
                + ", not from the pre-training (`DemoPlan.finetune_from`; BENCHMARKS.md)"
                + (
                    ": the trunk here trains ITC only, and the captioner's fusion and decoder already put "
                    "what they see, and where, into words, as the pre-trained decoder of mPLUG or BLIP "
                    "does before their VQA fine-tune."
                    if "caption" in chained.values()
                    else "."
                ),
            )
        )
    suffix = [t for t in res.get("tune_vit_suffix", []) if t in tasks]
    if suffix:
        out.append(
            (
                "p",
                f"{', '.join(suffix)}: the ViT blocks after the selection train too "
                "(`train.tune_vit_suffix`); they see only the kept patches, and the ViT below the "
                "selection stays frozen.",
            )
        )
    relevance = [t for t in res.get("fusion_relevance", []) if t in tasks]
    token = [t for t in res.get("relevance_token", []) if t in relevance]
    if relevance:
        out.append(
            (
                "p",
                f"{', '.join(relevance)}: the fusion also reads how well each kept patch matches the "
                "question by the model's own TPD (`train.fusion_relevance`)"
                + (
                    f"; {', '.join(token)}: with the kept tokens averaged by it as one more token "
                    "(`train.relevance_token`)"
                    if token
                    else ""
                )
                + ", in every row of the selector ablation too: the rows differ only in which patches "
                "are kept.",
            )
        )
    box = [t for t in res.get("box_relevance", []) if t in tasks]
    if box:
        out.append(
            (
                "p",
                f"{', '.join(box)}: the box head's score of each kept patch adds that patch's relevance "
                "by the model's own TPD, weighted per expression (`train.box_relevance`), in every row "
                "of the selector ablation too.",
            )
        )
    if behind:
        out.append(
            (
                "p",
                "Not above the trivial baseline at this run's fine-tuning budget: "
                + ", ".join(behind)
                + ". Short fine-tunes first learn the answer prior; BENCHMARKS.md has longer runs.",
            )
        )
    return out + _by_type_blocks(tasks)


def _verdicts(intervals: dict[str, dict[str, dict[str, float]]], tight: dict[str, float]) -> str:
    """One sentence per task column: the rows COPA beats, loses to, or ties with on the test samples
    (bracketed: the paired bootstrap 95% interval of COPA minus the row, over resampled test images)."""
    parts = []
    for col, rows in intervals.items():
        task = col.removesuffix("_tight")
        where = (
            f"{task} at keep {tight[task]}"
            if col != task and task in tight
            else f"{task} at the recommended keep"
        )
        won = [r for r, iv in rows.items() if iv["low"] > 0]
        lost = [r for r, iv in rows.items() if iv["high"] < 0]
        tied = [r for r in rows if r not in won and r not in lost]
        parts.append(
            f"{where}: COPA beats {', '.join(won) or 'no row'}"
            + (f"; loses to {', '.join(lost)}" if lost else "")
            + (f"; within the interval of {', '.join(tied)}" if tied else "")
        )
    return (
        "Brackets: the 95% interval of COPA minus the row on the same test samples (paired bootstrap over "
        "test images). " + ". ".join(parts) + "."
    )


# the learning issue's targets for the full demo: (label, how to read it from results, target, baseline label)
TARGETS = [
    ("text specificity @0.25 (COPA)", ("ablation", "specificity@0.25"), 0.5, "0 (random / text-blind)"),
    ("object-patch recall @0.5 (phrase, COPA)", ("ablation", "recall_phrase"), 0.9, "0.5 (random)"),
    ("VQA accuracy (%)", ("task", "vqa"), 70.0, "majority answer"),
    ("grounding acc@0.5 (%)", ("task", "grounding"), 60.0, "centre box"),
    ("retrieval mean recall (%)", ("task", "retrieval"), 50.0, "random ranking"),
    ("CIDEr", ("task", "caption"), 1.5, "empty caption"),
]


def _target_value(res: dict[str, Any], where: tuple[str, str]) -> tuple[Any, Any]:
    kind, key = where
    if kind == "ablation":
        rows = res.get("ablation_pta", {}).get("rows", {})
        copa = next((r for name, r in rows.items() if "COPA" in name), {})
        return copa.get(key), (copa.get("recall_random") if key.startswith("recall") else 0.0)
    if kind == "pretrain":
        return res.get("pretrain", {}).get("final_val", {}).get(key), res.get("pretrain", {}).get(
            "final_val", {}
        ).get("pta_recall_random")
    pruned = _pruned_row(res, key)
    return pruned.get("metric"), pruned.get("baseline")


def _pruned_row(res: dict[str, Any], task: str) -> dict[str, Any]:
    """The task's evaluation at the recommended keep ratio ({} when it did not run)."""
    rows = res.get("tasks", {}).get(task, {})
    return next((m for s, m in rows.items() if s.startswith("pruned")), {})


def _target_interval(res: dict[str, Any], where: tuple[str, str]) -> str:
    """A task target's bootstrap 95% interval over resampled test images, as ' [low, high]'; '' if none."""
    kind, key = where
    iv = _pruned_row(res, key).get("interval") if kind == "task" else None
    return f" [{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else ""


# a point of each task's headline metric (CIDEr is reported x100 in papers: a point is 0.01 here)
POINT = {"retrieval": 1.0, "vqa": 1.0, "caption": 0.01, "grounding": 1.0}


def _extra_target_rows(res: dict[str, Any]) -> list[tuple[str, Any, str, str, bool]]:
    """The targets that compare two numbers of the run: (label, value, target, baseline, met)."""
    out = []
    rows = res.get("ablation_pta", {}).get("rows", {})
    copa = next((r for name, r in rows.items() if "COPA" in name), {}).get("specificity@0.25")
    no_pta = rows.get("tpd without PTA", {}).get("specificity@0.25")
    if isinstance(copa, (int, float)) and isinstance(no_pta, (int, float)):
        out.append(
            (
                "specificity @0.25: COPA - tpd without PTA",
                copa - no_pta,
                ">= 0.25",
                f"{_fmt(no_pta)} (tpd without PTA)",
                copa - no_pta >= 0.25,
            )
        )
    pre = res.get("pretrain", {})
    itc, batch = pre.get("final_val", {}).get("val_itc"), pre.get("batch_size")
    if isinstance(itc, (int, float)) and batch:
        chance = math.log(batch)
        out.append(
            (
                "validation ITC (end of pre-training)",
                itc,
                f"<= {0.75 * chance:.2f} (0.75 ln B)",
                f"{chance:.2f} (ln B, chance)",
                itc <= 0.75 * chance,
            )
        )
    for task, d in res.get("pruned_vs_unpruned", {}).items():
        point = POINT.get(task, 1.0)
        value = f"{d['diff']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"
        out.append(
            (
                f"{task}: pruned (keep {d['keep_ratio']}) - unpruned, 95% interval",
                value,
                f">= {-point:g} (one point)",
                "0 (no pruning)",
                d["diff"] >= -point,
            )
        )
    return out


def _target_blocks(res: dict[str, Any]) -> list[Block]:
    if res.get("quick"):
        return []
    rows, missed = [], []
    for label, where, target, base_label in TARGETS:
        value, base = _target_value(res, where)
        ok = isinstance(value, (int, float)) and not math.isnan(value) and value >= target
        if not ok:
            missed.append(label)
        rows.append(
            [
                label,
                _fmt(value) + _target_interval(res, where),
                f">= {target:g}",
                f"{_fmt(base)} ({base_label})",
                "met" if ok else "MISSED",
            ]
        )
    for label, value, target, base, ok in _extra_target_rows(res):
        if not ok:
            missed.append(label)
        rows.append(
            [label, value if isinstance(value, str) else _fmt(value), target, base, "met" if ok else "MISSED"]
        )
    out: list[Block] = [
        ("h2", "Targets (test split; pruned model at the recommended keep ratio)"),
        ("table", (["metric", "this run", "target", "trivial baseline", ""], rows)),
        (
            "p",
            "Pruned - unpruned: the same fine-tuned weights on the same test samples; the interval is "
            "the 2.5-97.5 percentile of the difference over 2,000 test sets resampled by image. An "
            "interval that holds 0 means this test set cannot tell the two apart. A task's value "
            "carries the same interval of the value itself: how precisely this test split places it "
            "(a target met or missed is still judged on the value).",
        ),
    ]
    if missed:
        out.append(
            (
                "alert",
                "Targets missed in this run: "
                + ", ".join(missed)
                + ". The learning curves in BENCHMARKS.md say what more steps buy.",
            )
        )
    return out


def _other_style_blocks(res: dict[str, Any]) -> list[Block]:
    o = res.get("other_style")
    if not o:
        return []
    rows = [
        [
            name,
            _fmt(m.get("specificity@0.25")),
            _fmt(m.get("specificity@0.5")),
            _fmt(m.get("recall_phrase")),
            _fmt(m.get("recall_random")),
        ]
        for name, m in o["pta"].items()
    ]
    v = o["vqa"]
    return [
        ("h2", "On a scene style the training generator never makes"),
        (
            "p",
            (
                f"{o['images']} test scenes from `copa data synth --style alt`: gradient, striped "
                "or checkered "
                "backgrounds, other shades of the same colour names, tilted outlined shapes, other "
                "object and "
                f"image sizes, 1-5 objects. Keep ratio {o['keep_ratio']}."
            ),
        ),
        (
            "table",
            (
                ["selector", "specificity @0.25", "specificity @0.5", "object-patch recall", "random recall"],
                rows,
            ),
        ),
        (
            "p",
            (
                f"VQA (COPA's fine-tuned model, pruned): {_fmt(v.get('accuracy'))}%, with another image "
                f"{_fmt(v.get('blind_accuracy'))}%, majority answer {_fmt(v.get('baseline_accuracy'))}%."
            ),
        ),
        *_adapted_blocks(o),
    ]


def _adapted_blocks(o: dict[str, Any]) -> list[Block]:
    a = o.get("vqa_adapted")
    if not a:
        return []
    return [
        (
            "p",
            (
                f"`copa adapt-stem` row: the same models with the conv stem's BatchNorm statistics "
                f"re-estimated on {o['adapted_images']} other, unlabelled scenes of this style (AdaBN; no "
                "label, no weight changed). The training statistics shift every feature downstream on a "
                f"new look. VQA with them: {_fmt(a.get('accuracy'))}%, with another image "
                f"{_fmt(a.get('blind_accuracy'))}%."
            ),
        )
    ]


def _bench_blocks(res: dict[str, Any]) -> list[Block]:
    b = res.get("bench")
    if not b:
        return []
    rows = [
        [
            r.get("setting"),
            _fmt(r.get("flops_ratio"), 2),
            _fmt(r.get("speedup_vit"), 2),
            _fmt(r.get("speedup_e2e"), 2),
            _fmt(r.get("efficiency"), 2),
            _fmt(r.get("pairs_per_s"), 1),
        ]
        for r in b.get("rows", [])
    ]
    return [
        ("h2", "Speed (copa bench, tiny preset)"),
        ("p", b.get("hardware", "")),
        (
            "table",
            (
                ["keep setting", "FLOP ratio", "ViT speedup", "end-to-end speedup", "efficiency", "pairs/s"],
                rows,
            ),
        ),
    ]


def blocks(res: dict[str, Any]) -> list[Block]:
    title = "COPA demo report" + (" (quick)" if res.get("quick") else "")
    cpu = platform.processor() or platform.machine()
    hw = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out: list[Block] = [
        ("h1", title),
        (
            "p",
            (
                f"Everything below was produced by this run in {res.get('total_s', 0):.0f} s on {hw}. "
                f"Data: {res.get('data', {})} synthetic scenes (train/val/test)."
            ),
        ),
    ]
    out += (
        _run_alerts(res) + _target_blocks(res) + _pta_blocks(res) + _ablation_blocks(res) + _task_blocks(res)
    )
    out += _other_style_blocks(res) + _bench_blocks(res)
    timings = res.get("timings_s", {})
    if timings:
        out += [
            ("h2", "Stage timings"),
            ("table", (["stage", "seconds"], [[k, _fmt(v, 1)] for k, v in timings.items()])),
        ]
    out += [
        ("h2", "Reproduce"),
        (
            "p",
            (
                "The exact commands behind every number: the demo ran each of them, with these arguments, "
                "through copa.cli.main and read its numbers from the files it wrote. The plots are "
                "drawn from "
                "those files."
            ),
        ),
        ("code", "\n".join(res.get("commands", []))),
    ]
    if res.get("library_calls"):
        out += [
            ("p", "Run as library calls (no copa command does these yet):"),
            ("code", "\n".join(res["library_calls"])),
        ]
    return out


def to_markdown(bs: list[Block]) -> str:
    lines: list[str] = []
    for kind, v in bs:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + v, ""]
        elif kind == "p":
            lines += [v, ""]
        elif kind == "alert":
            lines += [f"> **{v}**", ""]
        elif kind == "table":
            header, rows = v
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
        elif kind == "img":
            lines += [f"![{v[1]}]({v[0]})", ""]
        elif kind == "code":
            lines += ["```", v, "```", ""]
    return "\n".join(lines)


def to_html(bs: list[Block]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>COPA demo report</title>",
        (
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
            "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style>"
        ),
        "</head><body>",
    ]
    for kind, v in bs:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(v)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(v)}</p>")
        elif kind == "alert":
            parts.append(f"<p style='color:#b00;font-weight:bold'>{html.escape(v)}</p>")
        elif kind == "table":
            header, rows = v
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        elif kind == "img":
            parts.append(f"<img src='{html.escape(v[0])}' alt='{html.escape(v[1])}'>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(v)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    bs = blocks(results)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(bs))
    page.write_text(to_html(bs))
    return md, page

"""The report's targets table: met / MISSED from the run's own numbers, the comparisons included."""

from __future__ import annotations

import math

from copa.report import _target_blocks, to_markdown


def _results(copa_spec: float, itc: float, vqa_diff: float) -> dict:
    return {
        "quick": False,
        "pretrain": {"final_val": {"val_itc": itc}, "batch_size": 32},
        "ablation_pta": {
            "rows": {
                "tpd without PTA": {"specificity@0.25": 0.01, "recall_phrase": 0.8},
                "tpd + PTA, boxes on ~5% (COPA)": {
                    "specificity@0.25": copa_spec,
                    "recall_phrase": 0.97,
                    "recall_random": 0.5,
                },
            }
        },
        "tasks": {"vqa": {"pruned (keep 0.5)": {"metric": 40.0, "baseline": 14.0}}},
        "pruned_vs_unpruned": {
            "vqa": {
                "keep_ratio": 0.5,
                "diff": vqa_diff,
                "low": vqa_diff - 2,
                "high": vqa_diff + 2,
                "groups": 60,
            },
            "caption": {"keep_ratio": 0.5, "diff": -0.02, "low": -0.05, "high": 0.01, "groups": 60},
        },
    }


def _rows(md: str) -> dict[str, str]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5:
            rows[cells[0]] = cells[4]
    return rows


def test_targets_table_marks_each_comparison_from_the_run() -> None:
    good = _rows(to_markdown(_target_blocks(_results(0.55, 2.2, -0.5))))
    assert good["specificity @0.25: COPA - tpd without PTA"] == "met"
    assert good["validation ITC (end of pre-training)"] == "met"
    assert good["vqa: pruned (keep 0.5) - unpruned, 95% interval"] == "met"
    # a CIDEr point is 0.01: -0.02 is two points down
    assert good["caption: pruned (keep 0.5) - unpruned, 95% interval"] == "MISSED"
    assert good["VQA accuracy (%)"] == "MISSED"  # 40 < 70

    bad = _rows(to_markdown(_target_blocks(_results(0.1, 0.8 * math.log(32), -1.5))))
    assert bad["specificity @0.25: COPA - tpd without PTA"] == "MISSED"
    assert bad["validation ITC (end of pre-training)"] == "MISSED"
    assert bad["vqa: pruned (keep 0.5) - unpruned, 95% interval"] == "MISSED"
    assert _target_blocks({**_results(0.55, 2.2, 0.0), "quick": True}) == []


def test_a_task_target_shows_its_interval_and_is_still_judged_on_its_value() -> None:
    res = _results(0.55, 2.2, 0.0)
    md = to_markdown(_target_blocks(res))
    assert "| VQA accuracy (%) | 40.000 |" in md  # no interval recorded: the value alone
    res["tasks"]["vqa"]["pruned (keep 0.5)"]["interval"] = [35.0, 72.0]  # holds the target 70
    md = to_markdown(_target_blocks(res))
    assert "| VQA accuracy (%) | 40.000 [35.000, 72.000] |" in md
    assert _rows(md)["VQA accuracy (%)"] == "MISSED"


def test_task_table_says_which_heads_were_fine_tuned_unpruned() -> None:
    from copa.report import _task_blocks

    res = _results(0.55, 2.2, 0.0)
    res["tasks"]["grounding"] = {"pruned (keep 0.5)": {"metric": 40.0, "baseline": 0.0}}
    assert "fine-tuned on every patch" not in to_markdown(_task_blocks(res))
    res["finetune_unpruned"] = ["grounding", "caption"]  # caption did not run: not named
    md = to_markdown(_task_blocks(res))
    assert "grounding: the head was fine-tuned on every patch" in md and "caption" not in md


def test_task_table_says_which_fine_tunes_trained_the_vit_after_the_selection() -> None:
    from copa.report import _task_blocks

    res = _results(0.55, 2.2, 0.0)
    assert "train too" not in to_markdown(_task_blocks(res))
    res["tune_vit_suffix"] = ["vqa", "caption"]  # caption did not run: not named
    md = to_markdown(_task_blocks(res))
    assert "vqa: the ViT blocks after the selection train too (`train.tune_vit_suffix`)" in md
    assert "caption" not in md


def test_vqa_by_type_table_sets_each_type_beside_its_majority() -> None:
    from copa.report import _task_blocks

    res = _results(0.55, 2.2, 0.0)
    assert "VQA by question type" not in to_markdown(_task_blocks(res))
    by = lambda acc: {  # noqa: E731
        "shape": {"questions": 59, "accuracy": acc, "majority_answer": "square", "majority_accuracy": 13.6},
        "count": {"questions": 60, "accuracy": 67.0, "majority_answer": "2", "majority_accuracy": 25.0},
    }
    res["tasks"]["vqa"]["pruned (keep 0.5)"]["by_type"] = by(36.0)
    res["tasks"]["vqa"]["unpruned (keep 1.0)"] = {"metric": 41.0, "baseline": 14.0, "by_type": by(40.0)}
    md = to_markdown(_task_blocks(res))
    assert "| question type | questions | pruned (keep 0.5) | unpruned (keep 1.0) | majority" in md
    assert '| shape | 59 | 36.0 | 40.0 | 13.6 ("square") |' in md
    assert md.index("| count |") < md.index("| shape |")


def test_margin_table_gives_each_interval_and_says_which_rows_copa_beats() -> None:
    from copa.report import _ablation_blocks

    res = _results(0.55, 2.2, 0.0)
    copa, rows = "tpd + PTA, boxes on ~5% (COPA)", ("random", "tome", "tpd without PTA")
    res["ablation_pta"]["rows"].update({r: {"specificity@0.25": 0.0} for r in rows[:2]})
    res["ablation_pta"]["keep_ratio"] = 0.5
    res["ablation_tight_keep"] = {"grounding": 0.25}
    res["ablation_tasks"] = {
        copa: {"grounding_metric": 45.0, "grounding_tight_metric": 41.0},
        "random": {"grounding_metric": 30.0, "grounding_tight_metric": 17.0},
        "tome": {"grounding_metric": 44.0, "grounding_tight_metric": 43.0},
        "tpd without PTA": {"grounding_metric": 45.5, "grounding_tight_metric": 33.0},
    }

    def iv(low: float, high: float) -> dict:
        return {"diff": (low + high) / 2, "low": low, "high": high, "groups": 60}

    res["ablation_margins"] = {
        "grounding": {"random": iv(8, 22), "tome": iv(-3, 5), "tpd without PTA": iv(-4, 3)},
        "grounding_tight": {"random": iv(15, 33), "tome": iv(-6, -0.5), "tpd without PTA": iv(2, 14)},
    }
    md = to_markdown(_ablation_blocks(res))
    assert "+15.000 [+8.0, +22.0]" in md and "-2.000 [-6.0, -0.5]" in md
    assert (
        "grounding at the recommended keep: COPA beats random; within the interval of tome, tpd without PTA"
        in md
    )
    assert "grounding at keep 0.25: COPA beats random, tpd without PTA; loses to tome" in md

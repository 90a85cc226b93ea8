"""``build_dataset``: one read → validate → dataset chain under the config's limits; the skips of the
reader reach the dataset's report and from there the run summaries of pre-training and fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copa.config import DataConfig
from copa.data.build import build_dataset
from copa.data.dataset import PretrainDataset
from tests.conftest import TRAIN_MICRO, micro_config

# entries a reader cannot turn into records (no image field / not an object), and one whose box is
# malformed (the record stays, the object is left out)
NOT_RECORDS = [{"caption": "an entry without an image"}, "not a record at all"]
READER_SKIPS = {"malformed_record": 2, "malformed_field": 1}


@pytest.fixture(scope="module")
def with_bad_entries(synth_dir, tmp_path_factory) -> Path:
    """The synthetic training list (absolute image paths) plus entries only the reader sees."""
    entries = json.loads((synth_dir / "train.json").read_text())
    for e in entries:
        e["image"] = str(synth_dir / e["image"])
    broken = {**entries[0], "image_id": "broken_box", "objects": [{"box": "1 2 3", "phrase": "a box"}]}
    path = tmp_path_factory.mktemp("bad") / "train.json"
    path.write_text(json.dumps([*entries, broken, *NOT_RECORDS]))
    return path


def _counts(report) -> dict[str, int]:
    return {k: v for k, v in report.summary()["counts"].items() if k in READER_SKIPS}


def test_build_dataset_counts_the_reader_skips(with_bad_entries):
    cfg = DataConfig(train=str(with_bad_entries))
    ds = build_dataset(cfg, "train", 32, 8)
    assert isinstance(ds, PretrainDataset) and ds.builder.train
    assert _counts(ds.report) == READER_SKIPS
    n = len(json.loads(with_bad_entries.read_text()))
    assert (ds.report.records_in, ds.report.records_out) == (n, n - 2)
    cut = build_dataset(cfg, "train", 32, 8, max_records=3)  # a cut keeps what the reader read
    assert len(cut) == 3 and _counts(cut.report) == READER_SKIPS
    assert cut.report.records_in == 3 + 2


def test_build_dataset_takes_the_limits_from_the_config(synth_dir):
    """The 64-px synthetic images are "huge" under a 32-px limit, "tiny" under a 100-px minimum."""
    cfg = DataConfig(val=str(synth_dir / "val.json"), max_image_side=32)
    ds = build_dataset(cfg, "val", 32, 8)
    assert ds.report.summary()["counts"]["huge_image"] == len(ds) == 8
    with pytest.raises(ValueError, match="tiny_image"):
        build_dataset(DataConfig(val=cfg.val, min_image_side=100), "val", 32, 8)


def test_eval_loader_uses_the_config_limits(synth_dir):
    from copa.evaluation import eval_loader

    cfg = micro_config(f"data.val={synth_dir}/val.json", "data.max_image_side=32")
    ds = eval_loader(cfg, "val", max_images=4).dataset
    assert len(ds) == 4 and ds.report.summary()["counts"] == {"huge_image": 4}


def test_expand_derives_task_records(synth_dir):
    from copa.tasks.base import only

    cfg = DataConfig(val=str(synth_dir / "val.json"))
    ds = build_dataset(cfg, "val", 32, 8, expand=lambda r: [only(r, questions=[q]) for q in r.questions])
    assert len(ds) > 8 and all(len(r.questions) == 1 for r in ds.records)  # one sample per question
    with pytest.raises(ValueError, match="no samples for this task"):
        build_dataset(cfg, "val", 32, 8, expand=lambda r: [])


def test_pretrain_summary_counts_reader_skips(with_bad_entries, synth_dir, tmp_path):
    from copa.train.trainer import pretrain

    cfg = micro_config(
        *TRAIN_MICRO,
        "model.text.layers=1",
        f"data.train={with_bad_entries}",
        f"data.val={synth_dir}/val.json",
        "train.steps=1",
    )
    pretrain(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["data_report"]
    assert {k: report["train"]["counts"].get(k) for k in READER_SKIPS} == READER_SKIPS
    assert report["train"]["records_in"] - report["train"]["records_out"] == 2


def test_finetune_summary_counts_reader_skips(with_bad_entries, synth_dir, tmp_path):
    from copa.tasks.finetune import finetune
    from copa.tasks.registry import make_task

    cfg = micro_config(
        *TRAIN_MICRO,
        "model.text.layers=1",
        f"data.train={with_bad_entries}",
        f"data.val={synth_dir}/val.json",
        "train.steps=1",
    )
    finetune(make_task("vqa"), cfg, tmp_path / "ft", eval_split=None)
    report = json.loads((tmp_path / "ft" / "summary.json").read_text())["data_report"]
    assert {k: report["counts"].get(k) for k in READER_SKIPS} == READER_SKIPS
    assert report["records_in"] - report["records_out"] == 2

"""The bad-input corpus (tests/badcorpus.py) through every reader: exact counts, every good record
kept; through the shard stream over two epochs (counted once) and into a run's summary.json."""

from __future__ import annotations

import json

import pytest
from torch.utils.data import DataLoader

from copa.config import DataConfig
from copa.data.badinput import DataReport, validate_records
from copa.data.collate import Collator
from copa.data.dataset import StreamingPretrainDataset
from copa.data.readers import read_records
from tests.badcorpus import MAX_SIDE, MIN_SIDE, WRITERS, Corpus

LIMITS = DataConfig(max_image_side=MAX_SIDE, min_image_side=MIN_SIDE)  # what the expected counts assume


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Corpus]:
    root = tmp_path_factory.mktemp("corpus")
    return {name: write(root / name) for name, write in WRITERS.items()}


@pytest.mark.parametrize("reader", list(WRITERS))
def test_every_reader_counts_the_corpus_exactly(reader, corpora):
    c = corpora[reader]
    records = read_records(c.source)
    good, report = validate_records(records, LIMITS, decode=True)
    s = report.summary()
    assert s["counts"] == c.expected
    assert {r.image_id for r in good} == c.keep  # no good record lost, no bad one through
    assert s["records_in"] == c.records_in
    assert s["records_out"] == len(good) == c.extra.get("records_out", len(c.keep))


def test_shard_stream_counts_once_over_epochs(corpora):
    c = corpora["wds"]
    ds = StreamingPretrainDataset(str(c.source), LIMITS, 32, 8, train=True)
    total, seen = DataReport(), []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in DataLoader(ds, batch_size=4, collate_fn=Collator()):
            total.update(batch.events)
            seen.append(len(batch))
    assert sum(seen) == 3 * len(c.keep)
    assert total.summary()["counts"] == c.expected
    assert (total.records_in, total.records_out) == (c.records_in, len(c.keep))


@pytest.mark.parametrize("reader", ["json", "wds"])
def test_run_summary_counts_the_corpus_once(reader, corpora, tmp_path):
    """Pre-scan and reader (in memory) or stream events (shards, read for more than one epoch) end up
    in summary.json, train and validation split alike."""
    from copa.train.trainer import pretrain
    from tests.conftest import TRAIN_MICRO, micro_config

    c = corpora[reader]
    src = str(c.source)
    cfg = micro_config(
        *TRAIN_MICRO,
        "model.text.layers=1",
        f"data.train={src}",
        f"data.val={src}",
        f"data.max_image_side={MAX_SIDE}",
        f"data.min_image_side={MIN_SIDE}",
        "data.decode_check=true",
        "train.steps=4",
    )
    pretrain(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["data_report"]
    for split in ("train", "val"):
        assert report[split]["counts"] == c.expected, split
        assert (report[split]["records_in"], report[split]["records_out"]) == (c.records_in, len(c.keep))

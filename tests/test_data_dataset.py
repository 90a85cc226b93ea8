"""PretrainDataset + Collator: shapes, dtypes, label sums, optional fields, pickling, devices."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from copa.config import DataConfig
from copa.data.build import make_dataset
from copa.data.collate import Batch, Collator
from copa.data.dataset import PretrainDataset, StreamingPretrainDataset, build_dataloader
from copa.data.readers import read_records
from copa.data.records import Record
from copa.data.shards import write_shards
from copa.data.synth import write_synth

N = (64 // 16) ** 2


@pytest.fixture(scope="module")
def data_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, seed=1, n_train=8, n_val=8, n_test=0, image_size=64, box_share=0.25)
    return out


def _batch(records: list[Record], train: bool, max_phrases: int = 2, max_len: int = 40) -> Batch:
    ds = PretrainDataset(records, DataConfig(max_phrases=max_phrases), 64, 16, train=train)
    return Collator(max_len=max_len)([ds[i] for i in range(len(ds))])


def test_batch_shapes_dtypes_and_labels(data_synth):
    recs = read_records(data_synth / "val.json")[:4] + read_records(data_synth / "train.json")
    torch.manual_seed(0)
    b = _batch(recs, train=True)
    B = len(recs)
    L = b.caption_ids.shape[1]
    assert b.images.shape == (B, 3, 64, 64) and b.images.dtype == torch.float32
    assert b.image_ids.dtype == torch.long and b.image_ids.tolist() == list(range(B))
    assert b.caption_ids.dtype == b.caption_mask.dtype == torch.long and b.caption_mask.shape == (B, L)
    assert (b.caption_ids[:, 0] == 101).all()  # [CLS]
    assert b.caption_mask.sum(1).max() == L  # padded to the longest
    assert b.has_boxes.dtype == torch.bool and b.has_boxes.shape == (B,)
    P = b.phrase_ids.shape[0]
    assert b.phrase_mask.shape == (P, b.phrase_ids.shape[1]) and b.phrase_image.shape == (P,)
    assert b.phrase_labels.shape == (P, N) and b.phrase_labels.dtype == torch.float32
    assert len(b.phrases) == P and P > 0
    counts = torch.bincount(b.phrase_image, minlength=B)
    assert (counts <= 2).all() and (counts[~b.has_boxes] == 0).all()
    assert (b.phrase_labels.sum(1) >= 1).all() and set(b.phrase_labels.unique().tolist()) <= {0.0, 1.0}
    assert b.union_labels.shape == (B, N) and (b.union_labels[~b.has_boxes] == 0).all()
    assert (b.union_labels[b.has_boxes].sum(1) >= 1).all()
    for p in range(P):  # every phrase's positives are inside its image's union
        assert (b.phrase_labels[p] <= b.union_labels[b.phrase_image[p]]).all()
    assert b.question_ids.shape[0] == B and b.question_mask.shape == b.question_ids.shape
    assert b.has_question.all() and all(len(a) >= 1 for a in b.answers)
    assert b.ref_ids.shape[0] == B and b.ref_boxes.shape == (B, 4) and b.ref_valid.dtype == torch.bool
    rb = b.ref_boxes[b.ref_valid]
    assert ((rb >= 0) & (rb <= 1)).all() and (rb[:, 2:] > 0).all()
    assert b.events == {}


def test_eval_is_deterministic_and_uses_first_caption(data_synth):
    recs = read_records(data_synth / "val.json")
    a, b = _batch(recs, train=False, max_phrases=4), _batch(recs, train=False, max_phrases=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions == [r.captions[0] for r in recs]
    assert torch.equal(a.phrase_labels, b.phrase_labels)
    assert a.phrases == [o.phrase for r in recs for o in r.objects]  # eval: all boxes survive
    assert a.ref_valid.all()


def test_pta_reads_the_refs_of_boxed_images_in_training_only(data_synth):
    """Training samples of a boxed image name its boxes by object phrases or referring expressions,
    each box once; evaluation (the selection metrics) and ``pta_refs=False`` keep the object phrases."""
    from copa.data.transforms import swap_left_right

    recs = [r for r in read_records(data_synth / "val.json") if r.objects and r.refs]
    objects = {o.phrase for r in recs for o in r.objects}
    refs = {t for r in recs for x in r.refs for t in (x.phrase, swap_left_right(x.phrase))}
    ds = PretrainDataset(recs, DataConfig(max_phrases=8), 64, 16, train=True)
    torch.manual_seed(0)
    seen: set[str] = set()
    for _ in range(4):
        for i, rec in enumerate(recs):
            sample = ds[i]
            seen |= set(sample["phrases"])
            assert len(sample["phrases"]) <= len(rec.objects)  # each box once: refs name the objects' boxes
            assert sample["phrase_labels"].shape[0] == len(sample["phrases"])
    assert seen & (refs - objects) and seen <= objects | refs
    off = PretrainDataset(recs, DataConfig(max_phrases=8, pta_refs=False), 64, 16, train=True)
    assert {p for i in range(len(off)) for p in off[i]["phrases"]} <= objects
    ev = PretrainDataset(recs, DataConfig(max_phrases=8), 64, 16, train=False)
    named = [p for i in range(len(ev)) for p in ev[i]["phrases"]]
    assert named == [o.phrase for r in recs for o in r.objects]


def test_no_boxes_no_questions_gives_empty_shapes(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    recs = [Record(str(tmp_path / "a.png"), ["a plain picture"]), Record(str(tmp_path / "a.png"), ["same"])]
    b = _batch(recs, train=False)
    L = b.caption_ids.shape[1]
    assert b.phrase_ids.shape == (0, L) and b.phrase_mask.shape == (0, L) and b.phrase_labels.shape == (0, N)
    assert b.phrase_image.shape == (0,) and b.union_labels.shape == (2, N) and not b.has_boxes.any()
    assert b.question_ids is None and b.ref_ids is None and b.answers == []
    assert b.image_ids.tolist() == [0, 0]  # same image, same id


def test_max_len_truncates():
    long = Record("x", ["word " * 100])
    sample = {
        "caption": long.captions[0],
        "phrases": [],
        "union_labels": torch.zeros(N),
        "has_boxes": False,
        "image": torch.zeros(3, 64, 64),
        "image_id": 0,
        "question": None,
        "ref": None,
    }
    b = Collator(max_len=12)([sample])
    assert b.caption_ids.shape == (1, 12) and b.caption_ids[0, -1] == 102  # [SEP]


def test_pickle_loader_and_to(data_synth):
    recs = read_records(data_synth / "val.json")
    ds = PretrainDataset(recs, DataConfig(), 64, 16, train=True)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert len(ds2) == len(ds)
    pickle.dumps(Collator())
    dl = build_dataloader(ds, batch_size=4, train=True, num_workers=2)
    batches = list(dl)
    assert len(batches) == 2
    ids = torch.cat([b.image_ids for b in batches])
    assert sorted(ids.tolist()) == list(range(8))
    moved = batches[0].to("cpu")
    assert isinstance(moved, Batch) and moved.images.device.type == "cpu" and len(moved) == 4
    assert moved.captions == batches[0].captions


def test_make_dataset_picks_by_format(data_synth, tmp_path):
    cfg = DataConfig()
    ds = make_dataset(str(data_synth / "val.json"), cfg, 64, 16, train=False)
    assert isinstance(ds, PretrainDataset) and len(ds) == 8 and ds.report.records_out == 8
    coco = make_dataset(str(data_synth / "annotations" / "captions_val.json"), cfg, 64, 16, train=False)
    assert isinstance(coco, PretrainDataset) and len(coco) == 8
    write_shards(ds.records, tmp_path / "s", shard_size=4)
    for spec in (str(tmp_path / "s"), str(tmp_path / "s" / "shard-{000000..000001}.tar")):
        st = make_dataset(spec, cfg, 64, 16, train=True)
        assert isinstance(st, StreamingPretrainDataset)
        assert sum(1 for _ in st) == 8

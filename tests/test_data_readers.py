"""Readers: JSON records, plain ALBEF lists, COCO, Visual Genome, webdataset shards (+ rank/worker split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from copa.config import DataConfig
from copa.data.collate import Collator
from copa.data.dataset import StreamingPretrainDataset
from copa.data.readers import detect_format, read_coco, read_json, read_records, read_vg
from copa.data.records import QA, Obj, Record, Ref
from copa.data.shards import ShardDataset, expand_shards, iter_shards, split_shards, write_shards
from copa.data.synth import write_synth


@pytest.fixture(scope="module")
def data_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, seed=0, n_train=8, n_val=8, n_test=2, image_size=64, box_share=0.25)
    return out


def test_record_dict_round_trip():
    rec = Record(
        "a/b.png",
        ["one", "two"],
        [Obj((1.0, 2.0, 3.0, 4.0), "red circle")],
        [QA("what?", ["x", "y"]), QA("how many?", ["2"], "count")],
        [Ref("the red circle", (1.0, 2.0, 3.0, 4.0))],
        7,
        64,
        48,
    )
    d = json.loads(json.dumps(rec.to_dict()))
    assert Record.from_dict(d) == rec
    assert "type" not in d["questions"][0] and d["questions"][1]["type"] == "count"
    # VQA v2 calls it question_type; anything but a string is a clear error
    assert QA.from_dict({"question": "what color?", "answer": "red", "question_type": "what color"}).type
    with pytest.raises(TypeError, match="type must be a string"):
        QA.from_dict({"q": "what?", "answers": ["x"], "type": 3})


def test_json_records_round_trip(tmp_path):
    recs = [
        Record("img/0.png", ["a cat"], [Obj((0.0, 0.0, 5.0, 5.0), "cat")], image_id=0),
        Record("/abs/1.png", ["a dog"], questions=[QA("what?", ["dog"])], image_id="x1"),
    ]
    (tmp_path / "r.json").write_text(json.dumps([r.to_dict() for r in recs]))
    got = read_json(tmp_path / "r.json")
    assert got[0].image == str(tmp_path / "img/0.png") and got[1].image == "/abs/1.png"
    for g, r in zip(got, recs, strict=True):
        g.image = r.image
        assert g == r
    assert read_json(tmp_path / "r.json", image_root="/root")[0].image == "/root/img/0.png"


def test_plain_albef_list(tmp_path):
    data = [
        {"image": "a.jpg", "caption": "a man riding a horse"},
        {"image": "b.jpg", "caption": ["two dogs", "dogs playing"], "image_id": "b"},
        {"image": "c.jpg", "question": "what color?", "answer": ["red", "red"]},
        {"caption": "an entry without an image is skipped"},
        {"image": "d.jpg", "objects": [{"box": [1, 2], "phrase": "bad box"}]},
    ]
    (tmp_path / "pretrain.json").write_text(json.dumps(data))
    got = read_records(tmp_path / "pretrain.json", image_root="/data/coco")
    # the entry without an image is no record; d.jpg only loses its malformed box; both counted
    assert [r.image for r in got] == [f"/data/coco/{n}.jpg" for n in "abcd"]
    assert got[3].objects == [] and got.report.events() == {
        "malformed_record": 1,
        "malformed_field": 1,
        "records_in": 5,
        "records_out": 4,
    }
    assert got[0].captions == ["a man riding a horse"] and got[0].image_id == 0
    assert got[1].captions == ["two dogs", "dogs playing"] and got[1].image_id == "b"
    assert got[2].questions == [QA("what color?", ["red", "red"])] and got[2].captions == []


def _coco(tmp_path: Path) -> Path:
    ann = tmp_path / "annotations"
    ann.mkdir()
    images = [
        {"id": 1, "file_name": "train/1.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "train/2.jpg", "width": 32, "height": 32},
    ]
    caps = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "a cat"},
            {"id": 2, "image_id": 2, "caption": "a dog"},
            {"id": 3, "image_id": 1, "caption": "a cat on a mat"},
        ],
    }
    inst = {
        "images": images,
        "categories": [{"id": 5, "name": "cat"}, {"id": 6, "name": "mat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 6, "bbox": [0, 30, 64, 18], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 6, "bbox": [0, 0, 1, 1], "iscrowd": 1},
        ],
    }
    (ann / "captions_train.json").write_text(json.dumps(caps))
    (ann / "instances_train.json").write_text(json.dumps(inst))
    return ann / "captions_train.json"


def test_coco(tmp_path):
    path = _coco(tmp_path)
    for got in (
        read_coco(path),
        read_coco(tmp_path),
        read_records(path),
        read_records(path.with_name("instances_train.json")),
    ):
        assert [r.image_id for r in got] == [1, 2]
        assert got[0].image == str(tmp_path / "train/1.jpg")
        assert got[0].captions == ["a cat", "a cat on a mat"] and got[1].captions == ["a dog"]
        assert got[0].objects == [Obj((1.0, 2.0, 10.0, 20.0), "cat"), Obj((0.0, 30.0, 64.0, 18.0), "mat")]
        assert got[1].objects == [] and (got[0].width, got[0].height) == (64, 48)
    assert detect_format(tmp_path) == "coco"


def test_synth_coco_matches_json(data_synth):
    for split in ("train", "val"):
        js = read_records(data_synth / f"{split}.json")
        co = read_records(data_synth / "annotations" / f"captions_{split}.json")
        assert [(r.image, r.captions, r.objects, r.image_id) for r in js] == [
            (r.image, r.captions, r.objects, r.image_id) for r in co
        ]
        assert all(Path(r.image).is_file() for r in js)


def test_visual_genome(tmp_path):
    data = [
        {
            "id": 10,
            "regions": [
                {
                    "region_id": 1,
                    "image_id": 10,
                    "x": 5,
                    "y": 6,
                    "width": 7,
                    "height": 8,
                    "phrase": "a red car",
                },
                {
                    "region_id": 2,
                    "image_id": 10,
                    "x": 0,
                    "y": 0,
                    "width": 3,
                    "height": 3,
                    "phrase": "a red car ",
                },
                {"region_id": 3, "image_id": 10, "x": 1, "y": 1, "width": 2, "height": 2, "phrase": "sky"},
            ],
        },
        {"id": 11, "regions": []},
    ]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(data))
    got = read_vg(tmp_path / "region_descriptions.json", image_root="/vg")
    assert read_records(tmp_path / "region_descriptions.json", image_root="/vg") == got
    assert got[0].image == "/vg/10.jpg" and got[1].image == "/vg/11.jpg"
    assert got[0].objects[0] == Obj((5.0, 6.0, 7.0, 8.0), "a red car")
    assert len(got[0].objects) == 3 and got[0].captions == ["a red car", "sky"]
    assert got[0].image_id == 10


def test_shards_round_trip(data_synth, tmp_path):
    recs = read_records(data_synth / "val.json")
    paths = write_shards(recs, tmp_path / "shards", shard_size=3)
    assert len(paths) == 3
    assert expand_shards(str(tmp_path / "shards" / "shard-{000000..000002}.tar")) == paths
    assert expand_shards(tmp_path / "shards") == paths
    assert detect_format(tmp_path / "shards") == "wds"
    back = list(iter_shards(str(tmp_path / "shards")))
    assert back == read_records(tmp_path / "shards")
    assert len(back) == len(recs)
    for b, r in zip(back, recs, strict=True):
        assert (b.captions, b.objects, b.questions, b.refs, b.image_id) == (
            r.captions,
            r.objects,
            r.questions,
            r.refs,
            r.image_id,
        )
        assert b.data == Path(r.image).read_bytes()


def _ids(batch: list[Record]) -> list:
    return [r.image_id for r in batch]


def test_shards_split_by_rank_and_worker_exactly_once(data_synth, tmp_path):
    recs = read_records(data_synth / "val.json")
    write_shards(recs, tmp_path / "s", shard_size=1)  # 8 shards for 2 ranks x 2 workers
    seen = []
    for rank in range(2):
        ds = ShardDataset(str(tmp_path / "s"), rank=rank, world_size=2)
        dl = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_ids)
        mine = [i for b in dl for i in b]
        assert len(mine) == 4
        seen += mine
    assert sorted(seen) == sorted(r.image_id for r in recs)


def test_shard_split_covers_every_shard_once():
    urls = [f"s{i}" for i in range(11)]
    got = [u for r in range(3) for w in range(2) for u in split_shards(urls, r, 3, w, 2)]
    assert sorted(got) == sorted(urls)


def test_shard_split_reads_env(data_synth, tmp_path, monkeypatch):
    write_shards(read_records(data_synth / "val.json"), tmp_path / "s", shard_size=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [Path(u).name for u in ShardDataset(str(tmp_path / "s")).my_shards()] == [
        "shard-000001.tar",
        "shard-000003.tar",
    ]


def test_streaming_dataset_batches(data_synth, tmp_path):
    write_shards(read_records(data_synth / "val.json"), tmp_path / "s", shard_size=2)
    ds = StreamingPretrainDataset(str(tmp_path / "s"), DataConfig(), 64, 16, train=True)
    dl = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator())
    batches = list(dl)
    assert sum(len(b) for b in batches) == 8
    ids = torch.cat([b.image_ids for b in batches])
    assert len(set(ids.tolist())) == 8
    assert all(b.images.shape[1:] == (3, 64, 64) for b in batches)

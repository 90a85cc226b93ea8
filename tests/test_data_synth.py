"""Synthetic scenes: determinism, content, box share; the ``copa data`` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from copa.data.readers import read_records
from copa.data.shards import iter_shards
from copa.data.synth import COLOURS, SHAPES, png_writer, write_synth

SMALL = {"n_train": 6, "n_val": 3, "n_test": 2, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    write_synth(tmp_path / "a", seed=3, **SMALL)
    write_synth(tmp_path / "b", seed=3, **SMALL)
    write_synth(tmp_path / "c", seed=4, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 4 + 6 + 11  # 3 JSON lists + the all-boxes train list, 6 COCO files, 11 PNGs
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_content_and_box_share(tmp_path):
    summary = write_synth(tmp_path, seed=0, n_train=40, n_val=10, n_test=0, image_size=64, box_share=0.05)
    assert summary["train"] == {"images": 40, "with_boxes": 2} and summary["val"]["with_boxes"] == 10
    phrase = re.compile(rf"^(small|large) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})$")
    val = read_records(tmp_path / "val.json")
    train = read_records(tmp_path / "train.json")
    assert sum(bool(r.objects) for r in train) == 2
    kinds = set()
    for r in val + train:
        assert len(r.captions) >= 2 and all(r.captions)
        assert r.refs and all(0 < ref.box[2] and 0 < ref.box[3] for ref in r.refs)
        for qa in r.questions:
            kinds.add(qa.q.split()[0] + " " + qa.q.split()[1])
            assert qa.answers and len(qa.answers[0].split()) == 1
    for r in val:
        assert 1 <= len(r.objects) <= 4
        for o in r.objects:
            assert phrase.match(o.phrase), o.phrase
            x, y, w, h = o.box
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
    assert {"how many", "is there", "what color", "what shape"} <= kinds
    assert any("left" in c or "right" in c or "above" in c or "below" in c for r in val for c in r.captions)
    assert (tmp_path / "images" / "val" / "000009.png").is_file()
    assert not (tmp_path / "images" / "test").exists() or not any((tmp_path / "images" / "test").iterdir())


def test_cli_synth_and_shard(tmp_path, capsys):
    from copa.cli import main

    out = tmp_path / "synth"
    rc = main(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--seed",
            "2",
            "--n-train",
            "4",
            "--n-val",
            "3",
            "--n-test",
            "2",
            "--image-size",
            "64",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val"]["images"] == 3 and summary["seed"] == 2
    for name in (
        "train.json",
        "val.json",
        "test.json",
        "annotations/captions_train.json",
        "annotations/instances_val.json",
        "images/test/000001.png",
    ):
        assert (out / name).is_file(), name
    rc = main(
        ["data", "shard", "--src", str(out / "val.json"), "--out", str(tmp_path / "wds"), "--shard-size", "2"]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["shards"] == 2
    back = list(iter_shards(str(tmp_path / "wds")))
    assert [r.captions for r in back] == [r.captions for r in read_records(out / "val.json")]
    rc = main(["data", "check", "--src", str(tmp_path / "wds")])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["records"]["records_out"] == 3 and report["patch_share_positive"] > 0


def test_five_captions_change_nothing_else(tmp_path):
    write_synth(tmp_path / "a", seed=1, **SMALL)
    write_synth(tmp_path / "b", seed=1, **SMALL, n_captions=5)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in a.items() if k.endswith(".png")} == {
        k: v for k, v in b.items() if k.endswith(".png")
    }
    for split in ("train", "val", "test"):
        ra, rb = (
            read_records(tmp_path / "a" / f"{split}.json"),
            read_records(tmp_path / "b" / f"{split}.json"),
        )
        for x, y in zip(ra, rb, strict=True):
            assert len(x.captions) == 3 and len(y.captions) == 5 and y.captions[:3] == x.captions
            assert len(set(y.captions)) == 5 and all(y.captions)
            assert (x.objects, x.questions, x.refs) == (y.objects, y.questions, y.refs)


def test_png_writer_writes_every_image_before_the_block_ends_and_raises_a_failure(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(5)]
    with png_writer() as write:
        for i, img in enumerate(imgs):
            write(img, tmp_path / f"{i}.png")
    for i, img in enumerate(imgs):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{i}.png")), img)
    # with at most two queued, a write waits for the oldest: every image still lands
    with png_writer(max_pending=2) as write:
        for i, img in enumerate(imgs):
            write(img, tmp_path / f"b{i}.png")
    for i, img in enumerate(imgs):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"b{i}.png")), img)
    with pytest.raises(OSError), png_writer() as write:
        write(imgs[0], tmp_path / "missing_dir" / "x.png")

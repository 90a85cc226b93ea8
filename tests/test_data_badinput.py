"""Bad input: a corpus of broken files/texts/boxes mixed with good samples. Exact counts, no good
sample lost, no crash."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from copa.config import DataConfig
from copa.data.badinput import DataReport, clean_box, validate_records
from copa.data.dataset import PretrainDataset, build_dataloader
from copa.data.image_io import load_image
from copa.data.records import Obj, Record, Ref


def _png(path: Path, size=(32, 32), mode="RGB", colour=None) -> str:
    rng = np.random.default_rng(len(str(path)))
    if colour is None:
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(path)
    else:
        Image.new(mode, size, colour).save(path)
    return str(path)


def _truncated_jpeg(path: Path) -> str:
    arr = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return str(path)


BOX = (4.0, 4.0, 12.0, 12.0)


@pytest.fixture(scope="module")
def data_corpus(tmp_path_factory) -> tuple[list[Record], set[str]]:
    """(records, names of the records that must come through)."""
    d = tmp_path_factory.mktemp("bad")
    good = [
        Record(_png(d / f"good{i}.png"), [f"good image {i}"], [Obj(BOX, "thing")], image_id=f"good{i}")
        for i in range(6)
    ]
    (d / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)

    def rec(name: str, image: str, captions=("ok",), objects=(), refs=()) -> Record:
        return Record(image, list(captions), list(objects), refs=list(refs), image_id=name)

    def plain(name: str) -> str:  # one file per record: the dataset tells images apart by path
        return _png(d / f"{name}.png")

    bad = [
        rec("corrupt", str(d / "corrupt.jpg")),
        rec("truncated", _truncated_jpeg(d / "truncated.jpg")),
        rec("missing", str(d / "missing.png")),
        rec("tiny", _png(d / "tiny.png", size=(1, 1))),
        rec("empty_caption", plain("empty_caption"), captions=[""]),
        rec("space_caption", plain("space_caption"), captions=["  \n\t "]),
    ]
    repaired = [
        rec("alpha", _png(d / "alpha.png", mode="RGBA"), objects=[Obj(BOX, "a")]),
        rec("gray", _png(d / "gray.png", mode="L")),
        rec(
            "huge",
            _png(d / "huge.png", size=(5000, 5000), colour=(90, 120, 150)),
            objects=[Obj((1000.0, 2000.0, 500.0, 500.0), "patch")],
        ),
        rec("long", plain("long"), captions=["word " * 2000]),
        rec("unicode", plain("unicode"), captions=["ein Bär läuft über die Straße — 猫"]),
        rec("outside", plain("outside"), objects=[Obj((20.0, 20.0, 40.0, 40.0), "big")]),
        rec("zero_area", plain("zero_area"), objects=[Obj((5.0, 5.0, 0.0, 10.0), "flat"), Obj(BOX, "fine")]),
        rec(
            "negative",
            plain("negative"),
            objects=[Obj((-5.0, -5.0, 10.0, 10.0), "corner")],
            refs=[Ref("the corner", (-2.0, 3.0, 6.0, 6.0))],
        ),
    ]
    records = good[:3] + bad[:3] + repaired[:4] + good[3:] + bad[3:] + repaired[4:]
    return records, {r.image_id for r in good + repaired}  # type: ignore[misc]


EXPECTED = {
    "corrupt_file": 1,
    "missing_file": 1,
    "tiny_image": 1,
    "empty_caption": 2,
    "no_text": 2,
    "non_rgb_converted": 2,
    "huge_image": 1,
    "long_caption": 1,
    "non_ascii": 1,
    "box_outside": 1,
    "zero_area_box": 1,
    "negative_coords": 2,
}


def test_prescan_counts_exact(data_corpus):
    records, keep = data_corpus
    good, report = validate_records(records, decode=True)
    assert report.summary()["counts"] == {**EXPECTED, "truncated_image": 1}
    assert {r.image_id for r in good} == keep
    s = report.summary()
    assert (s["records_in"], s["records_out"]) == (len(records), len(keep))
    assert s["skipped"] == 4 + 2  # 4 unusable images + 2 records left without text
    by_id = {r.image_id: r for r in good}
    assert by_id["outside"].objects[0].box == (20.0, 20.0, 12.0, 12.0)
    assert by_id["negative"].objects[0].box == (0.0, 0.0, 5.0, 5.0)
    assert by_id["negative"].refs[0].box == (0.0, 3.0, 4.0, 6.0)
    assert [o.phrase for o in by_id["zero_area"].objects] == ["fine"]
    assert len(by_id["long"].captions[0]) <= 1000
    assert by_id["unicode"].captions == ["ein Bär läuft über die Straße — 猫"]
    assert (by_id["huge"].width, by_id["huge"].height) == (5000, 5000)


def _seen(ds: PretrainDataset, num_workers: int) -> tuple[list[str], DataReport]:
    report = DataReport()
    dl = build_dataloader(ds, batch_size=4, train=False, num_workers=num_workers)
    names = {i: ds.records[k].image_id for k, i in enumerate(ds.image_ids)}
    seen: list[str] = []
    for b in dl:
        report.update(b.events)
        assert torch.isfinite(b.images).all()
        seen += [names[i] for i in b.image_ids.tolist()]
    return seen, report


def test_dataloader_delivers_every_good_sample(data_corpus):
    records, keep = data_corpus
    ds = PretrainDataset(records, DataConfig(), 32, 8, train=False, decode=True)
    seen, lazy = _seen(ds, num_workers=2)
    assert sorted(seen) == sorted(keep)  # each good sample exactly once
    assert lazy.summary()["counts"] == {}


def test_lazy_failure_is_substituted_and_counted(data_corpus):
    records, keep = data_corpus
    ds = PretrainDataset(records, DataConfig(), 32, 8, train=True)  # header-only pre-scan
    assert ds.report.summary()["counts"] == EXPECTED  # the truncated JPEG passes its header check
    seen, lazy = _seen(ds, num_workers=0)
    assert lazy.summary()["counts"] == {"truncated_image": 1, "substituted": 1}
    assert set(seen) == keep and len(seen) == len(keep) + 1  # one counted duplicate stands in
    total = DataReport().merge(ds.report).merge(lazy)
    assert total.summary()["counts"]["truncated_image"] == 1


def test_huge_image_downscaled_with_its_boxes(data_corpus):
    records, _ = data_corpus
    huge = next(r for r in records if r.image_id == "huge")
    ld = load_image(huge, DataConfig(max_image_side=1024))
    assert max(ld.image.size) == 1024 and ld.image.mode == "RGB" and ld.repairs == ["huge_image"]
    assert ld.scale == pytest.approx((1024 / 5000, 1024 / 5000))
    good, _ = validate_records([huge])
    ds = PretrainDataset(good, DataConfig(), 64, 16, train=False, validate=False)
    s = ds[0]
    np.testing.assert_allclose(s["boxes"][0].numpy(), np.array([1000, 2000, 500, 500]) * 64 / 5000, rtol=1e-3)


def test_clean_box_cases():
    assert clean_box((1, 1, 5, 5), 10, 10) == ((1, 1, 5, 5), None)
    assert clean_box((1, 1, 0, 5), 10, 10) == (None, "zero_area_box")
    assert clean_box((1, 1, float("nan"), 5), 10, 10) == (None, "zero_area_box")
    assert clean_box((-3, 2, 5, 5), 10, 10) == ((0, 2, 2, 5), "negative_coords")
    assert clean_box((8, 8, 5, 5), 10, 10) == ((8, 8, 2, 2), "box_outside")
    assert clean_box((20, 20, 5, 5), 10, 10) == (None, "box_outside")
    assert clean_box((0, 0, 10.4, 10), 10, 10) == ((0, 0, 10, 10), None)  # sub-pixel overshoot
    assert clean_box((-20, 0, 5, 5), 10, 10) == (None, "negative_coords")
    assert clean_box((5, 5, 100, 100), None, None) == ((5, 5, 100, 100), None)  # size unknown


def test_report_merge_and_unknown_kind():
    a, b = DataReport(), DataReport()
    a.add("tiny_image")
    b.update({"tiny_image": 2, "long_caption": 1})
    assert a.merge(b).summary()["counts"] == {"tiny_image": 3, "long_caption": 1}
    with pytest.raises(ValueError):
        a.add("not_a_kind")


def test_all_bad_dataset_raises_cleanly(tmp_path):
    with pytest.raises(ValueError, match="no usable records"):
        PretrainDataset([Record(str(tmp_path / "nope.png"), ["x"])], DataConfig(), 32, 8, train=False)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    from tests.badcorpus import gray16_bytes

    (tmp_path / "g16.png").write_bytes(gray16_bytes((64, 32)))
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really 16 bits on disk
    ld = load_image(Record(str(tmp_path / "g16.png")))
    arr = np.asarray(ld.image)
    assert ld.image.mode == "RGB" and ld.repairs == ["non_rgb_converted"]
    assert arr.mean() == pytest.approx(127.5, abs=1.0)  # PIL's own convert clips: mean 254
    assert arr[:, 0].max() == 0 and arr[:, -1].min() == 255


def test_a_sliver_that_downscaling_would_make_too_thin_is_skipped(tmp_path):
    from copa.data.image_io import ImageError, check_image

    Image.new("RGB", (5000, 9), (1, 2, 3)).save(tmp_path / "sliver.png")
    rec = Record(str(tmp_path / "sliver.png"), ["a sliver"])
    for decode in (False, True):
        with pytest.raises(ImageError, match="thin_image"):
            check_image(rec, decode=decode)
    Image.new("RGB", (4000, 9), (1, 2, 3)).save(tmp_path / "narrow.png")  # no downscaling: usable
    assert check_image(Record(str(tmp_path / "narrow.png")))[:2] == (4000, 9)

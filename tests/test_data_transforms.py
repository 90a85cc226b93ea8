"""Transforms: boxes follow the pixels, flips swap left/right in every text, crops drop hidden boxes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from copa.config import DataConfig
from copa.data.dataset import SampleBuilder
from copa.data.records import QA, Obj, Record, Ref
from copa.data.synth import COLOURS, render_scene
from copa.data.transforms import (
    ImageBoxTransform,
    crop_boxes,
    random_resized_crop_params,
    swap_left_right,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("the red circle on the left", "the red circle on the right"),
        ("a star to the right of a left square", "a star to the left of a right square"),
        ("Left or RIGHT?", "Right or LEFT?"),
        ("the leftmost object", "the rightmost object"),
        ("turn rightward with your left-hand", "turn leftward with your right-hand"),
        ("a bright copyright leftover, righteous", "a bright copyright leftover, righteous"),
        ("left.", "right."),
    ],
)
def test_swap_left_right(text, want):
    assert swap_left_right(text) == want
    assert swap_left_right(swap_left_right(text)) == text


def test_random_resized_crop_params_in_bounds():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (100, 30), (30, 100), (8, 8)]:
        for _ in range(50):
            x0, y0, cw, ch = random_resized_crop_params(w, h, (0.5, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= x0 and 0 <= y0 and cw > 0 and ch > 0 and x0 + cw <= w and y0 + ch <= h


def test_crop_boxes_drops_mostly_hidden():
    boxes = np.array([[0, 0, 10, 10], [25, 25, 10, 10], [90, 90, 5, 5]], dtype=float)
    out, keep = crop_boxes(boxes, (5, 5, 25, 25), min_visible=0.3)
    # box 0: 5x5 of 100 visible (0.25) -> dropped; box 1: 5x5 = 0.25 -> dropped; box 2 outside
    assert keep.tolist() == [False, False, False]
    out, keep = crop_boxes(boxes, (5, 5, 25, 25), min_visible=0.2)
    assert keep.tolist() == [True, True, False]
    np.testing.assert_allclose(out[0], [0, 0, 5, 5])
    np.testing.assert_allclose(out[1], [20, 20, 5, 5])


def test_eval_resize_scales_boxes_exactly():
    img = Image.new("RGB", (64, 32))
    t = ImageBoxTransform((128, 128), train=False)
    aug = t(img, np.array([[8, 4, 16, 8]]), np.random.default_rng(0))
    np.testing.assert_allclose(aug.boxes, [[16, 16, 32, 32]])
    assert aug.image.shape == (3, 128, 128) and not aug.flipped


def _colour_share(pix: np.ndarray, box: tuple[float, ...], target: np.ndarray) -> float:
    """Share of the box's central half (each side) within 60 per channel of ``target``."""
    x, y, w, h = box
    r = pix[int(y + h / 4) : int(np.ceil(y + 3 * h / 4)), int(x + w / 4) : int(np.ceil(x + 3 * w / 4))]
    return float((np.abs(r - target).max(-1) < 60).mean())


def test_boxes_follow_pixels_under_augmentation():
    """Many random crops/flips of scenes: the centre of every kept box is the object's colour,
    while the same box moved away from the object is not (so the check is not vacuous)."""
    t = ImageBoxTransform(
        (64, 64),
        train=True,
        crop_scale=(0.3, 1.0),
        hflip=0.5,
        min_visible=0.3,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    checked = flipped = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        specs = [
            ("square", "red", "large", 28.0, 30.0),
            ("circle", "blue", "large", 84.0, 90.0),
            ("diamond", "yellow", "large", 90.0, 28.0),
        ]
        img, objs = render_scene(specs, 128, rng)
        aug = t(Image.fromarray(img), np.array([o.box for o in objs]), rng)
        flipped += aug.flipped
        pix = (aug.image.permute(1, 2, 0).numpy() * 255.0).astype(np.float64)
        for o, box, keep in zip(objs, aug.boxes, aug.keep, strict=True):
            if not keep or box[2] < 4 or box[3] < 4:
                continue
            x, y, w, h = box
            target = np.array(COLOURS[o.colour], dtype=np.float64)

            assert _colour_share(pix, (x, y, w, h), target) >= 0.5, (seed, o, box)
            # a box-sized window shifted off the object, where it fits, is not the object's colour
            sx = x + 1.5 * w if x + 2.5 * w <= 64 else x - 1.5 * w
            if 0 <= sx:
                assert _colour_share(pix, (sx, y, w, h), target) < 0.5
            checked += 1
    assert checked > 60 and 5 < flipped < 35


def _record() -> tuple[Record, Image.Image]:
    img, objs = render_scene(
        [("square", "red", "large", 20.0, 32.0), ("circle", "blue", "small", 50.0, 32.0)],
        64,
        np.random.default_rng(0),
    )
    rec = Record(
        image="",
        captions=["a large red square to the left of a small blue circle"],
        objects=[
            Obj(o.box, f"{o.phrase} on the {side}") for o, side in zip(objs, ["left", "right"], strict=True)
        ],
        questions=[QA("is the red square on the left or the right?", ["left"])],
        refs=[Ref("the leftmost object", objs[0].box)],
        width=64,
        height=64,
    )
    return rec, Image.fromarray(img)


def test_flip_swaps_texts_and_moves_boxes(tmp_path):
    rec, img = _record()
    img.save(tmp_path / "a.png")
    rec.image = str(tmp_path / "a.png")
    cfg = DataConfig(hflip=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), pta_refs=False)
    b = SampleBuilder(cfg, 64, 16, train=True)
    s = b(rec, 0, np.random.default_rng(0))
    assert s["caption"] == "a large red square to the right of a small blue circle"
    assert sorted(s["phrases"]) == ["large red square on the right", "small blue circle on the left"]
    # PTA's referring expressions (data.pta_refs) flip with the image as well
    with_refs = SampleBuilder(dataclasses.replace(cfg, pta_refs=True), 64, 16, train=True)
    flipped = {"large red square on the right", "small blue circle on the left", "the rightmost object"}
    named = [set(with_refs(rec, 0, np.random.default_rng(seed))["phrases"]) for seed in range(8)]
    assert set().union(*named) == flipped  # the expression is drawn, flipped, in some samples
    assert s["question"] == "is the red square on the right or the left?" and s["answers"] == ["right"]
    assert s["ref"] == "the rightmost object"
    # the red square was on the left; after the flip its box (first object) is on the right
    x, _, w, _ = s["boxes"][0].tolist()
    ox, _, ow, _ = rec.objects[0].box
    assert x == pytest.approx(64 - ox - ow) and w == pytest.approx(ow)
    cx = s["ref_box"][0].item()
    assert cx == pytest.approx((64 - ox - ow / 2) / 64) and s["ref_valid"]
    # no flip: texts unchanged
    s = SampleBuilder(DataConfig(hflip=0.0), 64, 16, train=False)(rec, 0, np.random.default_rng(0))
    assert s["caption"] == rec.captions[0] and s["ref"] == "the leftmost object"
    assert torch.equal(s["phrase_labels"].amax(0), s["union_labels"])

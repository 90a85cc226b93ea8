"""The evaluation-only second scene style: deterministic, same vocabulary, another look."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from copa.data.synth import COLOURS, SHAPES, SIZES
from copa.data.synth_alt import ALT_COLOURS, IMAGE_SIZES, write_synth_alt


def test_alt_style_is_deterministic_and_readable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synth_alt(a, seed=3, n_test=10)
    write_synth_alt(b, seed=3, n_test=10)
    assert (a / "test.json").read_bytes() == (b / "test.json").read_bytes()
    assert (a / "images/test/000004.png").read_bytes() == (b / "images/test/000004.png").read_bytes()
    recs = json.loads((a / "test.json").read_text())
    for r in recs:
        im = Image.open(a / r["image"])
        assert im.size == (r["width"], r["height"]) and r["width"] in IMAGE_SIZES
        assert 1 <= len(r["objects"]) <= 5
        for o in r["objects"]:
            x, y, w, h = o["box"]
            assert 0 <= x and 0 <= y and x + w <= r["width"] and y + h <= r["height"] and w > 2 and h > 2
            size, colour, shape = o["phrase"].split()
            # the words the model was trained on: questions stay answerable, phrases queryable
            assert size in SIZES and colour in COLOURS and shape in SHAPES
        assert r["questions"] and r["captions"]


def test_alt_style_differs_in_look_from_the_main_generator():
    # other shades for every colour name, and object sizes outside the training ranges
    assert all(np.abs(np.subtract(ALT_COLOURS[c], COLOURS[c])).max() >= 20 for c in COLOURS)
    from copa.data.synth_alt import ALT_SIZES

    assert ALT_SIZES["small"][0] < SIZES["small"][0] and ALT_SIZES["large"][1] > SIZES["large"][1]


def test_cli_writes_the_alt_split(tmp_path):
    from copa.cli import main

    assert main(["data", "synth", "--style", "alt", "--n-test", "3", "--out", str(tmp_path / "alt")]) == 0
    assert len(json.loads((tmp_path / "alt/test.json").read_text())) == 3

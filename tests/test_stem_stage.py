"""The image stem's warm start on labelled objects: only the stem moves and learns to name the
objects, labels land on the right cells, bad images are skipped and counted, the command writes a
model that pre-training starts from."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from copa.data.readers import read_records
from copa.data.records import Obj, Record
from copa.errors import UserError
from copa.model.copa import COPAModel, build_model, load
from copa.train.stem_stage import (
    STEM_FILE,
    covered_cells,
    load_stem,
    object_labels,
    phrase_words,
    run_stem_stage,
    train_stem,
    vocabulary,
    word_loss,
)
from tests.conftest import MICRO, TRAIN_MICRO, train_config


def test_only_the_stem_learns_to_name_the_objects(synth_dir):
    cfg = train_config(synth_dir, "model.vision.stem=conv")
    torch.manual_seed(0)
    model = COPAModel(cfg.model)
    model.text.freeze(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    recs = read_records(synth_dir / "train_all_boxes.json")
    res, _ = train_stem(model, cfg, recs, steps=60, batch_size=8, lr=3e-3, val_records=recs)
    assert res.steps == 60 and res.images == len(recs) and res.skipped == {}
    assert res.last_loss < 0.7 * res.first_loss, res
    assert {"small", "large"} <= set(res.vocabulary)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("vision.patch_embed.") for k in moved), sorted(moved)[:5]
    assert any("running_mean" in k for k in moved)  # the BatchNorm statistics are the new images'
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # it names the objects it was trained on far better than the most frequent words do
    val = res.val
    assert val["objects"] == sum(len(r.objects) for r in recs)
    assert val["word_recall"] > 0.6 and val["phrase_accuracy"] > val["phrase_accuracy_majority"] + 0.1, val


def test_labels_land_on_the_cell_under_the_object_centre():
    index = {w: i for i, w in enumerate(["big", "dog", "red"])}
    rec = Record(
        image="x.png",
        width=100,
        height=50,
        objects=[
            Obj((60.0, 10.0, 20.0, 20.0), "a big red dog"),  # centre (70, 20): column 2, row 1 of 4
            Obj((95.0, 10.0, 20.0, 20.0), "red dog"),  # centre outside the image
            Obj((0.0, 0.0, 10.0, 10.0), "a cat"),  # no word of the vocabulary
        ],
    )
    (lab,) = object_labels(rec, index, 4, (100, 50))
    assert lab.cell == 1 * 4 + 2 and lab.words == (0, 2, 1)
    # with ``cover`` every cell the box covers by that share of its area: the box spans x 2.4-3.2 and
    # y 0.8-2.4 cells, covering cell (row 1, col 2) by 0.6, (1, 3) 0.2, (2, 2) 0.24, (0, 2) 0.12
    covered = object_labels(rec, index, 4, (100, 50), cover=0.15)
    assert [lab.cell for lab in covered] == [1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 2]
    assert all(lab.words == (0, 2, 1) for lab in covered)
    assert [lab.cell for lab in object_labels(rec, index, 4, (100, 50), cover=0.5)] == [1 * 4 + 2]
    # a box covering no cell by the share still labels the cell under its centre
    assert covered_cells((0.6, 0.2, 0.2, 0.2), 4, 0.7) == []
    assert [lab.cell for lab in object_labels(rec, index, 4, (100, 50), cover=0.7)] == [1 * 4 + 2]
    assert phrase_words("The red, red Dog") == ["the", "red", "dog"]
    assert vocabulary([rec]) == ["a", "big", "cat", "dog", "red"]


def test_word_loss_is_the_cross_entropy_to_the_objects_words():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    right = torch.tensor([[9.0, 9.0, -9.0, -9.0]])
    assert word_loss(right, target) == pytest.approx(math.log(2), abs=1e-3)  # its two words share the mass
    assert word_loss(torch.zeros(1, 4), target) == pytest.approx(math.log(4))
    assert word_loss(-right, target) > 10


def test_unreadable_images_are_skipped_and_counted(synth_dir, tmp_path):
    recs = json.loads((synth_dir / "train_all_boxes.json").read_text())
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs[0]["image"] = str(tmp_path / "broken.png")
    recs[1]["image"] = str(tmp_path / "missing.png")
    recs[2]["objects"] = []
    (tmp_path / "recs.json").write_text(json.dumps(recs))
    cfg = train_config(synth_dir)
    res, _ = train_stem(
        COPAModel(cfg.model), cfg, read_records(tmp_path / "recs.json"), steps=8, batch_size=8
    )
    assert res.steps == 8
    assert res.skipped["unreadable_images"] == 2
    assert res.skipped["records_without_labelled_objects"] == 1
    # nothing readable at all: a clear error, not an endless loop
    bad = [r | {"image": str(tmp_path / "missing.png")} for r in recs[3:]]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="without a labelled object"):
        train_stem(COPAModel(cfg.model), cfg, read_records(tmp_path / "bad.json"), steps=2, batch_size=4)


def test_records_without_phrases_and_bad_settings_are_user_errors(synth_dir):
    cfg = train_config(synth_dir)
    model = COPAModel(cfg.model)
    recs = read_records(synth_dir / "train.json")
    bare = [Record(image=r.image, width=r.width, height=r.height) for r in recs]
    with pytest.raises(UserError, match="nothing to learn"):
        train_stem(model, cfg, bare, steps=2)
    with pytest.raises(UserError, match="positive number of steps"):
        train_stem(model, cfg, recs, steps=0)
    with pytest.raises(UserError, match="positive batch size"):
        train_stem(model, cfg, recs, steps=2, batch_size=0)
    with pytest.raises(UserError, match="cover"):
        train_stem(model, cfg, recs, steps=2, cover=1.5)


def test_the_command_writes_the_model_pretraining_starts_from(synth_dir, tmp_path):
    cfg = train_config(synth_dir, "model.vision.stem=conv")
    recs = synth_dir / "train_all_boxes.json"
    summary = run_stem_stage(cfg, recs, tmp_path / "stem", steps=3, batch_size=4)
    assert summary["steps"] == 3 and summary["val"]["objects"] > 0  # data.val carries objects
    saved = json.loads((tmp_path / "stem" / "summary.json").read_text())
    assert saved["vocabulary"] == summary["vocabulary"]
    model = load(tmp_path / "stem" / "model")
    fresh = COPAModel(cfg.model).state_dict()
    stem = [k for k in model.state_dict() if k.startswith("vision.patch_embed.")]
    assert any(not torch.equal(model.state_dict()[k], fresh[k]) for k in stem)
    assert Counter(k.split(".")[0] for k in model.state_dict()) == Counter(k.split(".")[0] for k in fresh)
    # seeded: the same command gives the same model
    torch.manual_seed(123)  # whatever the caller's RNG state
    run_stem_stage(cfg, recs, tmp_path / "again", steps=3, batch_size=4)
    again = load(tmp_path / "again" / "model").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    # labelling every cell an object covers reads more cells from the same images and steps
    covered = run_stem_stage(cfg, recs, tmp_path / "covered", steps=3, batch_size=4, cover=0.25)
    assert covered["cover"] == 0.25 and summary["cover"] is None
    assert covered["objects"] > summary["objects"]
    assert covered["val"]["objects"] == summary["val"]["objects"]  # validated at the centres alike


def test_the_cli_refuses_a_negative_cover(synth_dir, tmp_path, capfd):
    """0 is the CLI's "off"; any other value outside (0, 1] reaches the stage's check."""
    from copa.cli import main

    data = [f"data.{split}={synth_dir}/{split}.json" for split in ("train", "val", "test")]
    sets = [a for s in (*MICRO, *TRAIN_MICRO, *data) for a in ("--set", s)]
    records = str(synth_dir / "train_all_boxes.json")
    argv = ["stem-stage", "--config", "configs/tiny.yaml", *sets, "--records", records]
    assert main([*argv, "--out", str(tmp_path / "s"), "--steps", "1", "--cover", "-0.5"]) != 0
    assert "the stem stage's cover is a share of a cell's area" in capfd.readouterr().err


def test_a_saved_stem_goes_back_into_a_fresh_model_and_measures_the_same(synth_dir, tmp_path):
    """OUT/stem.safetensors holds the stem, its head and vocabulary: a later stage with --stem and 0
    steps puts exactly those weights into a fresh model and measures what the first stage did; with
    more steps it goes on from them and the file counts every step."""
    cfg = train_config(synth_dir, "model.vision.stem=conv")
    recs = synth_dir / "train_all_boxes.json"
    first = run_stem_stage(cfg, recs, tmp_path / "a", steps=3, batch_size=4)
    saved = tmp_path / "a" / STEM_FILE
    stem = load_stem(saved)
    assert stem.vocabulary == first["vocabulary"] and stem.info["steps"] == 3
    assert stem.signature == {"stem": "conv", "patch_size": 8, "width": 64}
    loaded = run_stem_stage(cfg, None, tmp_path / "b", steps=0, stem=saved)
    assert loaded["val"] == first["val"] and loaded["first_loss"] is None
    assert loaded["saved"]["steps"] == 3 and loaded["saved"]["records"] == str(recs)
    a, b = load(tmp_path / "a" / "model").state_dict(), load(tmp_path / "b" / "model").state_dict()
    stem_keys = [k for k in a if k.startswith("vision.patch_embed.")]
    assert stem_keys and all(torch.equal(a[k], b[k]) for k in stem_keys)
    torch.manual_seed(cfg.seed)  # everything else is the seeded fresh model's, as without --stem
    fresh = build_model(cfg.model).state_dict()
    assert all(torch.equal(b[k], fresh[k]) for k in b if k not in stem_keys and "text." not in k)
    more = run_stem_stage(cfg, recs, tmp_path / "c", steps=2, batch_size=4, stem=saved)
    assert more["saved"]["steps"] == 5 and more["saved"]["continued"]["steps"] == 3
    assert load_stem(tmp_path / "c" / STEM_FILE).info["steps"] == 5


def test_a_stem_that_does_not_fit_or_is_not_a_stem_is_a_user_error(synth_dir, tmp_path):
    cfg = train_config(synth_dir, "model.vision.stem=conv")
    recs = synth_dir / "train_all_boxes.json"
    run_stem_stage(cfg, recs, tmp_path / "a", steps=1, batch_size=4)
    saved = tmp_path / "a" / STEM_FILE
    wider = train_config(synth_dir, "model.vision.stem=conv", "model.vision.width=96")
    fit = r"another image stem \(model.vision.width: 64 there, 96 here\); train one"
    with pytest.raises(UserError, match=fit):
        run_stem_stage(wider, None, tmp_path / "b", steps=0, stem=saved)
    with pytest.raises(UserError, match="no such file"):
        load_stem(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not a stem written by `copa stem-stage`"):
        load_stem(tmp_path / "a" / "model" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match="not a stem written by `copa stem-stage`"):
        load_stem(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="needs --records"):
        run_stem_stage(cfg, None, tmp_path / "c", steps=2, stem=saved)
    with pytest.raises(UserError, match="positive number of steps"):
        run_stem_stage(cfg, recs, tmp_path / "d", steps=0)
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_the_shipped_stem_names_the_objects_of_scenes_it_never_saw(tmp_path):
    """The stem shipped in copa/assets (``make stem-asset``) fits the tiny preset and names the objects
    of new synthetic scenes (another seed than the one it was trained on) with its own head, far above
    the most frequent words."""
    from copa.assets import STEM_TINY
    from copa.config import load_config
    from copa.data.synth import write_synth
    from copa.train.stem_stage import apply_stem

    write_synth(tmp_path, seed=7, n_train=1, n_val=16, n_test=1, image_size=128, box_share=1.0)
    cfg = load_config("configs/pretrain_tiny.yaml", [f"data.val={tmp_path}/val.json", "train.precision=fp32"])
    saved = load_stem(STEM_TINY)
    assert saved.info["steps"] >= 1000 and saved.info["images"] >= 5000
    model = COPAModel(cfg.model)
    apply_stem(model, saved)
    res, _ = train_stem(model, cfg, [], 0, val_records=read_records(tmp_path / "val.json"), start=saved)
    val = res.val
    assert val["objects"] >= 20
    assert val["phrase_accuracy"] > 0.7 and val["phrase_accuracy"] > val["phrase_accuracy_majority"] + 0.5, (
        val
    )

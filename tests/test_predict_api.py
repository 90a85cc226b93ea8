"""The inference API: the checkpoint carries its preprocessing; ``load_model_and_transforms`` and
``Predictor`` take PIL images, paths or bytes and strings, batch them, and compute what the
evaluation computes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import copa
from copa.config import CLIP_MEAN, ConfigError, load_config, with_model
from copa.model.copa import COPAModel
from tests.conftest import MICRO, micro_config, scene_png


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    return [
        scene_png(d / "a.png", (48, 40), 0),
        scene_png(d / "b.png", (40, 56), 1),
        scene_png(d / "c.png", (32, 32), 2),
    ]


@pytest.fixture(scope="module")
def predictor(micro_ckpt):
    return copa.Predictor.from_pretrained(micro_ckpt, device="cpu", batch_size=2)


# ------------------------------------------------------------------ preprocessing in the checkpoint
def test_config_normalisation_has_one_source():
    cfg = load_config("configs/tiny.yaml", MICRO)
    assert tuple(cfg.data.mean) == tuple(cfg.model.preprocess.mean) == CLIP_MEAN
    half = "[0.5, 0.5, 0.5]"
    cfg = load_config(
        "configs/tiny.yaml", [*MICRO, f"model.preprocess.mean={half}", f"model.preprocess.std={half}"]
    )
    assert tuple(cfg.data.mean) == (0.5, 0.5, 0.5) and tuple(cfg.data.std) == (0.5, 0.5, 0.5)
    # the older data.* keys still work and become the model's, so the saved model records them
    cfg = load_config("configs/tiny.yaml", [*MICRO, f"data.mean={half}"])
    assert tuple(cfg.model.preprocess.mean) == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="set model.preprocess.mean only"):
        load_config(
            "configs/tiny.yaml", [*MICRO, f"data.mean={half}", "model.preprocess.mean=[0.4, 0.4, 0.4]"]
        )
    # a checkpoint's preprocessing replaces the run's for its data
    other = micro_config("model.preprocess.mean=[0.1, 0.2, 0.3]").model
    assert tuple(with_model(cfg, other).data.mean) == (0.1, 0.2, 0.3)


def test_checkpoint_carries_preprocessing(tmp_path, images):
    torch.manual_seed(0)
    cfg = micro_config("model.preprocess.mean=[0.5, 0.5, 0.5]", "model.preprocess.std=[0.25, 0.25, 0.25]")
    COPAModel(cfg.model).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert saved["preprocess"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    model, transform, tokenizer = copa.load_model_and_transforms(tmp_path / "m")
    assert transform == model.image_transform
    assert (transform.image_size, transform.mean, transform.std) == (32, (0.5,) * 3, (0.25,) * 3)
    x = transform(Image.open(images[0]).convert("RGB"))
    raw = (
        torch.tensor(
            list(Image.open(images[0]).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC).getdata()),
            dtype=torch.float32,
        )
        .t()
        .reshape(3, 32, 32)
        / 255
    )
    assert x.shape == (3, 32, 32) and torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-5)
    ids, mask = tokenizer(["a red circle", "a blue square left of it"])
    assert ids.shape == mask.shape and ids.shape[0] == 2 and int(ids[0, 0]) == tokenizer.hf.cls_token_id
    # a checkpoint written before preprocessing was saved reads as the defaults it was trained with
    del saved["preprocess"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**meta, "model": saved}))
    assert copa.load(tmp_path / "m").image_transform.mean == CLIP_MEAN


def test_transform_equals_the_evaluation_input(micro_ckpt, images):
    """The API's tensor for an image is the evaluation dataset's, bit for bit."""
    from copa.data.dataset import PretrainDataset
    from copa.data.records import Record

    model, transform, _ = copa.load_model_and_transforms(micro_ckpt)
    cfg = with_model(load_config("configs/tiny.yaml", MICRO), model.cfg)
    ds = PretrainDataset([Record(str(images[1]), ["x"])], cfg.data, 32, 8, train=False)
    assert torch.equal(ds[0]["image"], transform(Image.open(images[1]).convert("RGB")))


@pytest.mark.parametrize("kind", ["vit", "vit_with_processor", "clip"])
def test_convert_records_the_checkpoints_normalisation(tmp_path, kind):
    import transformers

    from copa.cli import main

    small = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    if kind == "clip":
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small)).save_pretrained(tmp_path / "src")
    else:
        transformers.ViTModel(transformers.ViTConfig(**small), add_pooling_layer=False).save_pretrained(
            tmp_path / "src"
        )
    if kind == "vit_with_processor":
        (tmp_path / "src" / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})
        )
    sets = [s for s in MICRO if not s.startswith("model.vision.")] + ["model.select.layers=[1]"]
    argv = [
        "convert",
        "--config",
        "configs/tiny.yaml",
        "--vision",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    want = {"vit": (0.5, 0.5, 0.5), "vit_with_processor": (0.485, 0.456, 0.406), "clip": CLIP_MEAN}[kind]
    assert copa.load(tmp_path / "m").image_transform.mean == pytest.approx(want)


# ------------------------------------------------------------------ the predictor
def test_inputs_as_path_pil_or_bytes_agree(predictor, images):
    a = predictor.kept_patches(images[0], "a red circle")
    b = predictor.kept_patches(Image.open(images[0]), "a red circle")
    c = predictor.kept_patches(images[0].read_bytes(), ["a red circle"])
    assert a == b == c and len(a) == 1


def test_kept_patches_follow_keep_ratio(predictor, images):
    n = predictor.grid**2
    kept = predictor.kept_patches(images, ["a red circle", "a blue square", None])
    assert [len(k) for k in kept] == [math.ceil(0.5 * n)] * 3
    assert all(len(set(k)) == len(k) and all(0 <= i < n for i in k) for k in kept)
    assert predictor.kept_patches(images[:1], None, keep_ratio=1.0) == [list(range(n))]
    assert len(predictor.kept_patches(images[0], "x", keep_ratio=0.25)[0]) == math.ceil(0.25 * n)
    assert predictor.model.vision.keep_ratios == [0.5]  # restored
    with pytest.raises(ValueError, match="keep ratio"):
        predictor.kept_patches(images[0], "x", keep_ratio=1.5)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        predictor.kept_patches(images, ["a", "b"])
    img = predictor.overlay(images[1], kept[1], size=100, box=predictor.ground(images[1], "x")[0])
    assert img.size[0] == img.size[1] and img.size[0] % predictor.grid == 0


def test_answer_and_caption_are_batch_invariant(micro_ckpt, predictor, images):
    one = copa.Predictor.from_pretrained(micro_ckpt, device="cpu", batch_size=1)
    qs = ["what color is the circle?", "how many objects are there?", "is there a square?"]
    assert predictor.answer(images, qs, max_new_tokens=3) == one.answer(images, qs, max_new_tokens=3)
    answers = predictor.answer(images[0], qs, answer_list=["red", "blue", "2"])  # one image, three questions
    assert len(answers) == 3 and set(answers) <= {"red", "blue", "2"}
    caps = predictor.caption(images, decode="greedy", max_new_tokens=3)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert caps == one.caption(images, decode="greedy", max_new_tokens=3)


def test_ground_returns_pixel_boxes_of_the_original_image(predictor, images):
    boxes = predictor.ground(images, "the red circle")
    for box, path in zip(boxes, images, strict=True):
        w, h = Image.open(path).size
        assert 0 <= box.x0 <= box.x1 <= w and 0 <= box.y0 <= box.y1 <= h
        d = box.to_dict()
        assert d["box_xywh"][2] == pytest.approx(d["box_xyxy"][2] - d["box_xyxy"][0], abs=0.02)
    # the same normalised box, scaled by each image's own size
    model = predictor.model
    ids, mask = predictor.tokenizer(["the red circle"])
    x = predictor.prepare(images[1]).pixels
    with torch.no_grad():
        g = model.ground(model(x, ids, mask)).box[0]
    w, h = Image.open(images[1]).size
    assert boxes[1].x0 + boxes[1].x1 == pytest.approx(2 * float(g[0]) * w, abs=1e-3)


def test_retrieve_is_itc_then_itm_on_full_pairs(predictor, images):
    """With every pair a candidate, each final score is ITM log-odds of the full (image, text)
    forward + ITC similarity: the shared-prefix re-rank computes exactly that."""
    texts = ["a red circle", "a blue square", "three objects", "a green star"]
    res = predictor.retrieve(images, texts, k=2, itm_topk=10)
    assert res.image_to_text.shape == (3, 4) and res.text_to_image.shape == (4, 3) and res.itm_pairs == 12
    model = predictor.model
    x = predictor.prepare(images).pixels
    ids, mask = predictor.tokenizer(texts)
    with torch.no_grad():
        for i in range(3):
            logits = model.itm_logits(model(x[i : i + 1].expand(4, -1, -1, -1), ids, mask))
            want = (logits[:, 1] - logits[:, 0]) + res.itc[i]
            assert torch.allclose(res.image_to_text[i], want, atol=1e-4)
    top = res.top_images()
    assert len(top) == 4 and all(len(t) == 2 for t in top) and top[0][0][1] >= top[0][1][1]
    assert predictor.retrieve(images, texts, itm_topk=1).itm_pairs < 12  # only the top candidates


def test_unreadable_image_raises_a_typed_error(predictor, tmp_path):
    from copa.preprocess import ImageError

    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError) as e:
        predictor.caption(tmp_path / "bad.png")
    assert e.value.kind == "corrupt_file"


# ------------------------------------------------------------------ the README's snippet runs as written
def _readme_snippet() -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_snippet_runs_as_written(micro_ckpt, tmp_path, monkeypatch):
    """The README's Python API example, executed in a directory laid out as `make demo` leaves it
    (micro models in place of the trained ones, two PNGs made here)."""
    import shutil

    root = Path(__file__).parents[1]
    for task in ("vqa", "grounding", "caption", "retrieval"):
        shutil.copytree(micro_ckpt, tmp_path / "runs" / "demo" / "tasks" / task / "model")
    scene_png(tmp_path / "scene.png", (60, 44), 3)
    scene_png(tmp_path / "other.png", (44, 60), 4)
    monkeypatch.chdir(tmp_path)
    code = _readme_snippet()
    assert "copa.Predictor" in code and "load_model_and_transforms" in code
    exec(compile(code, str(root / "README.md"), "exec"), {"__name__": "readme"})  # noqa: S102 (the README is ours)
    assert (tmp_path / "kept.png").is_file()

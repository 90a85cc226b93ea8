"""Every user mistake is one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copa.cli import main
from tests.conftest import MICRO, scene_png


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Broken inputs: data files, a YAML config and damaged copies of a saved micro model."""
    import torch

    from copa.config import load_config
    from copa.model.copa import COPAModel

    d = tmp_path_factory.mktemp("mistakes")
    (d / "empty.json").write_text("")
    (d / "object.json").write_text(json.dumps({"not": "records"}))
    (d / "list.json").write_text("[]")
    (d / "number.json").write_text("42")
    (d / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    scene_png(d / "scene.png")
    (d / "bad.png").write_bytes(b"not an image")
    (d / "empty_dir").mkdir()
    (d / "images.json").write_text(json.dumps({"image": "scene.png"}))
    torch.manual_seed(0)
    good = d / "model"
    COPAModel(load_config("configs/tiny.yaml", MICRO).model).save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    meta = json.loads(config)

    def damaged(name: str, weights_bytes: bytes, config_text: str) -> None:
        (d / name).mkdir()
        (d / name / "model.safetensors").write_bytes(weights_bytes)
        (d / name / "config.json").write_text(config_text)
        for f in good.iterdir():  # the tokenizer files
            if f.name not in ("model.safetensors", "config.json"):
                (d / name / f.name).write_bytes(f.read_bytes())

    damaged("truncated_weights", weights[: len(weights) // 2], config)
    damaged("not_safetensors", b"PK\x03\x04 a zip, say " * 100, config)
    damaged("garbage_config", weights, "{this is not json")
    damaged("no_model_section", weights, json.dumps({"format": "copa"}))
    narrow = {**meta, "model": {**meta["model"], "vision": {**meta["model"]["vision"], "width": 32}}}
    damaged("config_not_the_weights", weights, json.dumps(narrow))
    damaged("unknown_key", weights, json.dumps({**meta, "model": {**meta["model"], "colour": 1}}))
    return d


def _info(*sets: str) -> list[str]:
    return ["info", "--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def _evaluate(ckpt: str, *extra: str) -> list[str]:
    return ["evaluate", "retrieval", "--ckpt", ckpt, "--out", "{d}/eval", *extra]


def _predict(task: str, *extra: str) -> list[str]:
    ckpt = [] if "--ckpt" in extra else ["--ckpt", "{d}/model"]
    image = [] if "--image" in extra else ["--image", "{d}/scene.png"]
    return ["predict", task, *ckpt, *image, "--out", "{d}/pred.jsonl", *extra]


def _pretrain(*sets: str) -> list[str]:
    return [
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        "--out",
        "{d}/run",
        *[a for s in [*MICRO, *sets] for a in ("--set", s)],
    ]


CASES = {
    "keep ratio above 1": (_info("model.select.keep_ratios=[1.5]"), "keep ratio 1.5"),
    "keep ratio 0": (_info("model.select.keep_ratios=[0]"), "keep ratio 0"),
    "eval keep ratio": (_info("eval.keep_ratio=2"), "eval.keep_ratio"),
    "--keep-ratio flag": (_evaluate("{d}/model", "--keep-ratio", "0"), "--keep-ratio"),
    "select layer out of range": (_info("model.select.layers=[9]"), "model.select.layers"),
    "select layer 0": (_info("model.select.layers=[0]"), "model.select.layers"),
    "layers and ratios differ": (_info("model.select.layers=[2,3]"), "differ in length"),
    "unknown selector": (_info("model.select.selector=magic"), "unknown selector 'magic'"),
    "unknown precision": (_info("train.precision=fp8"), "train.precision"),
    "unknown format": (_info("data.format=xml"), "data.format"),
    "unknown format flag": (
        ["data", "check", "--src", "{d}/list.json", "--format", "xml"],
        "unknown data format",
    ),
    "batch size 0": (_info("train.batch_size=0"), "train.batch_size"),
    "eval batch size 0": (_info("eval.batch_size=0"), "eval.batch_size"),
    "steps 0": (_info("train.steps=0"), "train.steps"),
    "grad_accum 0": (_info("train.grad_accum=0"), "train.grad_accum"),
    "ckpt_every 0": (_info("train.ckpt_every=0"), "train.ckpt_every"),
    "malformed YAML": (["info", "--config", "{d}/bad.yaml"], "invalid YAML at line"),
    "malformed override": (_info("train.steps=[1,"), "invalid YAML"),
    "missing config file": (["info", "--config", "{d}/nope.yaml"], "config file not found"),
    "missing data file (check)": (["data", "check", "--src", "{d}/nope.json"], "data file not found"),
    "missing data dir (check)": (["data", "check", "--src", "{d}/nope"], "data file not found"),
    "missing data file (pretrain)": (_pretrain("data.train={d}/nope.json"), "data file not found"),
    "missing shards (pretrain)": (_pretrain("data.train={d}/s-{{000..002}}.tar"), "no shards found"),
    "empty JSON": (["data", "check", "--src", "{d}/empty.json"], "is empty"),
    "JSON object": (["data", "check", "--src", "{d}/object.json"], "a JSON object without COCO's 'images'"),
    "JSON number": (["data", "check", "--src", "{d}/number.json"], "a JSON int"),
    "empty list": (["data", "check", "--src", "{d}/list.json"], "no records"),
    "empty list (pretrain)": (_pretrain("data.train={d}/list.json"), "no records"),
    "evaluate a missing dir": (_evaluate("{d}/nope"), "is not a COPA checkpoint"),
    "truncated weights": (_evaluate("{d}/truncated_weights"), "cannot be loaded"),
    "non-safetensors weights": (_evaluate("{d}/not_safetensors"), "cannot be loaded"),
    "garbage config.json": (_evaluate("{d}/garbage_config"), "is not valid JSON"),
    "config.json without a model": (_evaluate("{d}/no_model_section"), "has no 'model' section"),
    "config.json not the weights": (_evaluate("{d}/config_not_the_weights"), "cannot be loaded"),
    "config.json unknown key": (_evaluate("{d}/unknown_key"), "unknown config key"),
    "predict a missing checkpoint": (_predict("caption", "--ckpt", "{d}/nope"), "not a COPA checkpoint"),
    "predict vqa without a question": (_predict("vqa"), "vqa needs --question"),
    "predict vqa with --text": (_predict("vqa", "--text", "x"), "vqa takes --question"),
    "predict grounding without a text": (_predict("grounding"), "grounding needs --text"),
    "predict retrieval without a text": (_predict("retrieval"), "retrieval needs at least one --text"),
    "predict --keep-ratio 0": (_predict("caption", "--keep-ratio", "0"), "--keep-ratio 0.0 is outside"),
    "predict a missing image": (_predict("caption", "--image", "{d}/nope"), "no such file or folder"),
    "predict only unreadable images": (_predict("caption", "--image", "{d}/bad.png"), "no readable image"),
    "predict an empty folder": (_predict("caption", "--image", "{d}/empty_dir"), "holds no images"),
    "predict a JSON object": (
        _predict("caption", "--image", "{d}/images.json"),
        "expected a non-empty JSON list",
    ),
    "predict on a missing GPU": (_predict("caption", "--device", "cuda:3"), "--device cuda:3"),
    "export an unknown part": (
        ["export", "--ckpt", "{d}/model", "--out", "{d}/x", "--parts", "decoder"],
        "--parts: unknown part(s) ['decoder']",
    ),
    "export --keep-ratio 2": (
        ["export", "--ckpt", "{d}/model", "--out", "{d}/x", "--keep-ratio", "2"],
        "--keep-ratio 2.0 is outside",
    ),
    "finetune --init missing": (
        ["finetune", "vqa", "--init", "{d}/nope", "--out", "{d}/ft"],
        "not a COPA checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_and_exit_2(case, files, capsys):
    argv, expected = CASES[case]
    rc = main([a.format(d=files) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]

"""``copa export``: every part runs in ONNX Runtime and as a ``torch.export`` program with the eager
model's outputs (max abs difference <= 1e-4 in fp32), at batch sizes other than the traced one."""

from __future__ import annotations

import json

import pytest
import torch

from copa.cli import main
from copa.export import PARTS, onnx_session, part_specs, run_onnx

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(micro_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "micro"
    assert main(["export", "--ckpt", str(micro_ckpt), "--out", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model(micro_ckpt):
    from copa.model.copa import load

    return load(micro_ckpt)


def test_manifest_describes_the_export(exported, model):
    out, manifest = exported
    assert set(manifest["parts"]) == set(PARTS)
    assert manifest["kept_patches"] == 8 and manifest["num_patches"] == 16 and manifest["visual_tokens"] == 10
    assert manifest["image_size"] == 32 and manifest["preprocess"]["mean"] == list(model.cfg.preprocess.mean)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("part", PARTS)
def test_part_parity(part, exported, model):
    """Stated parity of both formats (batch 3, a longer text than traced) and ONNX Runtime at
    batch 1 and 5 against eager."""
    out, manifest = exported
    entry = manifest["parts"][part]
    assert max(entry["onnx_max_abs_diff"].values()) <= TOL
    assert max(entry["torch_export_max_abs_diff"].values()) <= TOL
    session = onnx_session(out / f"{part}.onnx")
    for batch in (1, 5):
        spec = next(s for s in part_specs(model, batch=batch, seed=batch) if s.name == part)
        with torch.no_grad():
            eager = spec.module(*spec.inputs.values())
        eager = eager if isinstance(eager, tuple) else (eager,)
        got = run_onnx(session, spec.inputs)
        for name, e, o in zip(spec.outputs, eager, got, strict=True):
            assert tuple(o.shape) == tuple(e.shape), (part, name, batch)
            assert (torch.from_numpy(o).float() - e.float()).abs().max() <= TOL, (part, name, batch)
            if name == "kept":
                assert torch.equal(torch.from_numpy(o), e)


@pytest.mark.parametrize("part", ["heads", "vision_suffix"])
def test_saved_program_reloads_with_a_dynamic_batch(part, exported, model):
    out, _ = exported
    program = torch.export.load(str(out / f"{part}.pt2")).module()
    spec = next(s for s in part_specs(model, batch=5, seed=5) if s.name == part)
    with torch.no_grad():
        for e, p in zip(spec.module(*spec.inputs.values()), program(*spec.inputs.values()), strict=True):
            assert p.shape == e.shape and (p.float() - e.float()).abs().max() <= TOL


def test_onnx_pipeline_grounds_like_the_model(exported, model):
    """prefix -> text -> selection + suffix -> fusion -> heads, all in ONNX Runtime, equals the
    eager model's grounding box and ITM logits."""
    import numpy as np

    out, _ = exported
    sess = {p: onnx_session(out / f"{p}.onnx") for p in PARTS}
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    ids, mask = _tok(model)
    (prefix,) = sess["image_prefix"].run(None, {"images": images.numpy()})
    txt, query, _ = sess["text_encoder"].run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    tokens, kept = sess["vision_suffix"].run(None, {"prefix": prefix, "query": query})
    fi, ft = sess["fusion"].run(None, {"tokens": tokens, "txt": txt, "mask": mask.numpy(), "kept": kept})
    itm, box, _ = sess["heads"].run(
        None, {"fused_image": fi, "fused_cls": np.ascontiguousarray(ft[:, 0]), "kept": kept}
    )
    with torch.no_grad():
        fused = model(images, ids, mask)
        want_box, want_itm = model.ground(fused).box, model.itm_logits(fused)
    assert np.array_equal(kept, fused.vision.patch_index.numpy())
    assert np.abs(box - want_box.numpy()).max() <= TOL and np.abs(itm - want_itm.numpy()).max() <= TOL


def _tok(model):
    enc = model.tokenizer(
        ["the red circle", "a blue square on the left", "a star", "two objects"],
        padding=True,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.slow
def test_unpruned_export_keeps_every_patch(micro_ckpt, tmp_path):
    argv = [
        "export",
        "--ckpt",
        str(micro_ckpt),
        "--out",
        str(tmp_path),
        "--keep-ratio",
        "1.0",
        "--parts",
        "vision_agnostic",
        "--no-onnx",
    ]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["visual_tokens"] == 17 and not manifest["pruning"]
    program = torch.export.load(str(tmp_path / "vision_agnostic.pt2")).module()
    tokens, kept, _ = program(torch.randn(2, 17, 64))
    assert tokens.shape == (2, 17, 64) and torch.equal(kept, torch.arange(16).expand(2, -1))

"""Export the parts a server needs through ``torch.export`` and ONNX, with a dynamic batch.

COPA's selection keeps a static K patches (top-k + gather, no masks, no thresholds), so every part
has shapes known from the batch size alone and exports as one graph; threshold-based pruning, whose
token count depends on the data, cannot. The keep ratio is fixed per export (``keep_ratio``; K is in
the manifest); export once per keep ratio you serve.

Parts (B: batch, dynamic; L: text length, dynamic; N patches, T = 1+K+1 visual tokens, or 1+N
unpruned; Dv / Dt vision / text width, E the ITC size):

==================  ========================================  ===============================================
part                inputs                                    outputs
==================  ========================================  ===============================================
``image_prefix``    images (B, 3, H, W) float32               prefix (B, 1+N, Dv): the text-independent blocks
``text_encoder``    ids, mask (B, L) int64                    text (B, L, Dt), query (B, Dt), text_emb (B, E)
``vision_suffix``   prefix (B, 1+N, Dv), query (B, Dt)        tokens (B, T, Dv), kept (B, K) int64,
                                                              relevance (B, K) [1]
``vision_agnostic`` prefix (B, 1+N, Dv)                       tokens (B, T, Dv), kept (B, K), image_emb (B, E)
``fusion``          tokens (B, T, Dv), text, mask (B, L),     fused_image (B, T, Dt), fused_text (B, L, Dt)
                    kept (B, K), relevance (B, K) [1]
``heads``           fused_image, fused_cls (B, Dt), kept,     itm (B, 2) logits, box (B, 4) cxcywh in [0, 1],
                    relevance (B, K) [2]                      box_scores (B, K)
==================  ========================================  ===============================================

[1] only for a model whose fusion reads each kept patch's relevance (``model.fusion.relevance``).
[2] only for a model whose box head reads it (``model.box_relevance``); ``vision_suffix`` then
outputs it too.

Retrieval: ``image_prefix`` once per image, ``vision_agnostic`` for its ITC embedding; a text's
``text_emb`` from ``text_encoder``; re-ranking a pair runs ``vision_suffix`` on the stored prefix,
then ``fusion`` and ``heads`` (``itm``). Grounding: the same with the phrase, reading ``box``.
The decoder (captions, VQA answers) is generation with a KV cache, not exported here.

``export_model`` writes ``OUT/<part>.pt2`` (``torch.export.save``) and ``OUT/<part>.onnx``, the
tokenizer files, and ``OUT/manifest.json`` (parts, shapes, keep ratio, preprocessing, and the max
abs difference of ONNX Runtime against eager PyTorch per output, measured at another batch size
than the one traced).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from copa.config import to_dict
from copa.model.copa import COPAModel
from copa.model.parts import Fusion, Heads, ImagePrefix, TextEncoder, VisionAgnostic, VisionSuffix
from copa.model.selection import num_keep

log = logging.getLogger(__name__)

PARTS = ("image_prefix", "text_encoder", "vision_suffix", "vision_agnostic", "fusion", "heads")
TRACE_BATCH, CHECK_BATCH, TEXT_LEN = 2, 3, 12


# ------------------------------------------------------------------ specification
@dataclass
class PartSpec:
    """One exportable part: its module, input names + example inputs, which input dims are dynamic,
    and output names."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]
    dynamic: dict[str, dict[int, str]]
    outputs: list[str]
    check_inputs: dict[str, Tensor] = field(default_factory=dict)


def part_specs(
    model: COPAModel,
    batch: int = TRACE_BATCH,
    text_len: int = TEXT_LEN,
    seed: int = 0,
    check_batch: int = CHECK_BATCH,
) -> list[PartSpec]:
    """Every part with example inputs of ``batch`` rows (trace) and ``check_batch`` rows (parity),
    produced by the model itself, so each part sees realistic values."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    s, vocab = cfg.vision.image_size, cfg.text.vocab_size

    def chain(b: int, length: int) -> dict[str, Tensor]:
        images = torch.randn(b, 3, s, s, generator=g)
        ids = torch.randint(1000, vocab, (b, length), generator=g)
        mask = torch.ones(b, length, dtype=torch.long)
        mask[-1, length // 2 :] = 0  # a padded row, so the mask is really used
        with torch.no_grad():
            prefix = model.image_prefix(images)
            txt = model.text_states(ids, mask)
            query = model.text_query(txt, mask)
            vis = model.image_tokens(prefix, query)
            fused = model.fuse(vis, txt, mask)
            fi, ft = fused.image, fused.text
        return {
            "images": images,
            "ids": ids,
            "mask": mask,
            "prefix": prefix,
            "query": query,
            "tokens": vis.tokens,
            "txt": txt,
            "fused_image": fi,
            "fused_cls": ft[:, 0].contiguous(),
            "kept": vis.patch_index,
            "relevance": vis.relevance,
        }

    a, c = chain(batch, text_len), chain(check_batch, text_len + 3)

    def pick(d: dict[str, Any], *k: str) -> dict[str, Any]:
        return {n: d[n] for n in k}

    B, L = "batch", "length"
    # a fusion or box head that reads each kept patch's relevance gets it from vision_suffix
    rel = ("relevance",) if cfg.fusion.relevance else ()
    box_rel = ("relevance",) if cfg.box_relevance else ()
    suffix_rel = ("relevance",) if rel or box_rel else ()
    specs = [
        ("image_prefix", ImagePrefix, ("images",), {"images": {0: B}}, ["prefix"]),
        (
            "text_encoder",
            TextEncoder,
            ("ids", "mask"),
            {"ids": {0: B, 1: L}, "mask": {0: B, 1: L}},
            ["text", "query", "text_emb"],
        ),
        (
            "vision_suffix",
            VisionSuffix,
            ("prefix", "query"),
            {"prefix": {0: B}, "query": {0: B}},
            ["tokens", "kept", *suffix_rel],
        ),
        ("vision_agnostic", VisionAgnostic, ("prefix",), {"prefix": {0: B}}, ["tokens", "kept", "image_emb"]),
        (
            "fusion",
            Fusion,
            ("tokens", "txt", "mask", "kept", *rel),
            {"tokens": {0: B}, "txt": {0: B, 1: L}, "mask": {0: B, 1: L}, "kept": {0: B}}
            | ({"relevance": {0: B}} if rel else {}),
            ["fused_image", "fused_text"],
        ),
        (
            "heads",
            Heads,
            ("fused_image", "fused_cls", "kept", *box_rel),
            {"fused_image": {0: B}, "fused_cls": {0: B}, "kept": {0: B}}
            | ({"relevance": {0: B}} if box_rel else {}),
            ["itm", "box", "box_scores"],
        ),
    ]
    return [
        PartSpec(n, cls(model).eval(), pick(a, *ins), dyn, outs, pick(c, *ins))
        for n, cls, ins, dyn, outs in specs
    ]


# the text length is bounded by BERT's position table (512); the batch by nothing in the model
DIMS = {
    "batch": torch.export.Dim("batch", min=1, max=4096),
    "length": torch.export.Dim("length", min=2, max=512),
}


def _dynamic_shapes(spec: PartSpec) -> dict[str, Any]:
    dims: dict[str, Any] = {}
    for name, axes in spec.dynamic.items():
        dims[name] = {ax: DIMS[label] for ax, label in axes.items()}
    return {k: dims.get(k) for k in spec.inputs}


def export_part(spec: PartSpec) -> torch.export.ExportedProgram:
    """``torch.export`` of one part with its dynamic dims."""
    with torch.no_grad():
        return torch.export.export(
            spec.module, tuple(spec.inputs.values()), dynamic_shapes=_dynamic_shapes(spec), strict=False
        )


def _outputs(module: nn.Module, inputs: dict[str, Tensor]) -> list[Tensor]:
    with torch.no_grad():
        out = module(*inputs.values())
    return list(out) if isinstance(out, tuple) else [out]


def max_abs_diff(a: list[Tensor], b: list[Any]) -> list[float]:
    return [
        float((torch.as_tensor(x).float() - torch.as_tensor(y).float()).abs().max()) if x.numel() else 0.0
        for x, y in zip(a, b, strict=True)
    ]


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: dict[str, Tensor]) -> list[Any]:
    feed = {i.name: v.numpy() for i, v in zip(session.get_inputs(), inputs.values(), strict=True)}
    return session.run(None, feed)


@dataclass
class ExportReport:
    out: Path
    parts: dict[str, dict[str, Any]]

    @property
    def worst(self) -> float:
        return max((max(p["onnx_max_abs_diff"].values()) for p in self.parts.values()), default=0.0)


def export_model(
    model: COPAModel,
    out: str | Path,
    keep_ratio: float | None = None,
    onnx: bool = True,
    parts: tuple[str, ...] = PARTS,
    opset: int = 18,
) -> ExportReport:
    """Export ``parts`` of ``model`` into ``out`` (see the module docstring); returns what was written
    with the ONNX Runtime parity per output."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)  # their INFO is a line per graph pass
    # "torchvision is not installed. Skipping torchvision::nms" and the like: COPA uses none of those ops
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    model = model.eval().cpu()
    if keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)
    ratios = model.keep_ratios
    n = model.num_patches
    k = n
    for r in ratios if model.pruning else []:
        k = num_keep(k, r)
    report: dict[str, dict[str, Any]] = {}
    for spec in part_specs(model):
        if spec.name not in parts:
            continue
        t0 = time.perf_counter()
        ep = export_part(spec)
        torch.export.save(ep, str(out / f"{spec.name}.pt2"))
        eager = _outputs(spec.module, spec.check_inputs)
        entry: dict[str, Any] = {
            "inputs": {k_: list(v.shape) for k_, v in spec.inputs.items()},
            "dynamic": {k_: {str(a): d for a, d in v.items()} for k_, v in spec.dynamic.items()},
            "outputs": spec.outputs,
            "torch_export_max_abs_diff": dict(
                zip(spec.outputs, max_abs_diff(eager, _outputs(ep.module(), spec.check_inputs)), strict=True)
            ),
        }
        if onnx:
            path = out / f"{spec.name}.onnx"
            torch.onnx.export(
                ep,
                (),
                str(path),
                input_names=list(spec.inputs),
                output_names=spec.outputs,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            got = run_onnx(onnx_session(path), spec.check_inputs)
            entry["onnx_max_abs_diff"] = dict(zip(spec.outputs, max_abs_diff(eager, got), strict=True))
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report[spec.name] = entry
        log.info(
            "exported %s (%.1f s): %s",
            spec.name,
            entry["seconds"],
            entry.get("onnx_max_abs_diff", entry["torch_export_max_abs_diff"]),
        )
    model.tokenizer.save_pretrained(str(out))
    manifest = {
        "format": "copa-export",
        "version": 1,
        "parts": report,
        "check_batch": CHECK_BATCH,
        "trace_batch": TRACE_BATCH,
        "keep_ratios": ratios,
        "pruning": model.pruning,
        "num_patches": n,
        "kept_patches": k,
        "visual_tokens": 1 + k + (1 if model.pruning and model.cfg.select.fuse_dropped else 0),
        "image_size": model.cfg.vision.image_size,
        "patch_size": model.cfg.vision.patch_size,
        "preprocess": to_dict(model.cfg.preprocess),
        "max_text_len": model.cfg.text.max_len,
        "torch": torch.__version__,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ExportReport(out, report)


def timed(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``runs`` after ``warmup`` discarded calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] if times else math.nan

"""ONNX Runtime against eager PyTorch on this CPU, pruned and unpruned (BENCHMARKS.md, "Export").

    python scripts/bench_onnx.py --config configs/tiny.yaml --keep 1.0 --keep 0.5 --out runs/bench_onnx

For each keep ratio the model's parts are exported (``copa.export.export_model``) and timed, both
runtimes with the same thread count, fp32, batch ``--batch``, warm-up runs discarded, median of
``--runs``, eager and ONNX runs interleaved so drifts of a shared machine hit both alike:

- ``image``: image_prefix + vision_agnostic (the text-agnostic ViT + ITC embedding), images/s;
- ``pair``: text_encoder + image_prefix + vision_suffix + fusion + heads (an ITM / grounding query
  with text-aware selection), image-text pairs/s.

Weights do not change the timings, so without ``--ckpt`` the model is built from ``--config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from copa.config import load_config
from copa.export import export_model, onnx_session
from copa.model.copa import COPAModel, load

log = logging.getLogger("bench_onnx")


def pipelines(model: COPAModel, batch: int, text_len: int):
    """Eager and ONNX callables for the two measured paths, on fixed random inputs."""
    s = model.cfg.vision.image_size
    images = torch.randn(batch, 3, s, s)
    ids = torch.randint(1000, model.cfg.text.vocab_size, (batch, text_len))
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def eager_image():
        return model.encode_image(images)

    @torch.inference_mode()
    def eager_pair():
        fused = model(images, ids, mask)
        return model.itm_logits(fused), model.ground(fused).box

    return images, ids, mask, eager_image, eager_pair


def onnx_pipelines(d: Path, images, ids, mask, threads: int):
    import numpy as np

    sess = {
        p: onnx_session(d / f"{p}.onnx", threads)
        for p in ("image_prefix", "vision_agnostic", "text_encoder", "vision_suffix", "fusion", "heads")
    }
    x, i, m = images.numpy(), ids.numpy(), mask.numpy()

    def image():
        (prefix,) = sess["image_prefix"].run(None, {"images": x})
        return sess["vision_agnostic"].run(None, {"prefix": prefix})

    def pair():
        (prefix,) = sess["image_prefix"].run(None, {"images": x})
        txt, query, _ = sess["text_encoder"].run(None, {"ids": i, "mask": m})
        tokens, kept = sess["vision_suffix"].run(None, {"prefix": prefix, "query": query})
        fi, ft = sess["fusion"].run(None, {"tokens": tokens, "txt": txt, "mask": m, "kept": kept})
        return sess["heads"].run(
            None, {"fused_image": fi, "fused_cls": np.ascontiguousarray(ft[:, 0]), "kept": kept}
        )

    return image, pair


def interleaved(fns: dict[str, object], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--keep", type=float, action="append", default=[])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--out", default="runs/bench_onnx")
    ap.add_argument(
        "--exports",
        default=None,
        metavar="DIR",
        help="keep the exports in DIR/keep_<r> and reuse them on the next run (timing only)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = load(args.ckpt) if args.ckpt else COPAModel(load_config(args.config).model).eval()
    rows = []
    for keep in args.keep or [1.0, 0.5]:
        model.set_keep_ratio(keep)
        images, ids, mask, eager_image, eager_pair = pipelines(model, args.batch, args.text_len)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(args.exports) / f"keep_{keep}" if args.exports else Path(tmp)
            t0 = time.perf_counter()
            if (d / "manifest.json").is_file():  # exported by an earlier run: time only
                worst = max(
                    max(p["onnx_max_abs_diff"].values())
                    for p in json.loads((d / "manifest.json").read_text())["parts"].values()
                )
            else:
                worst = export_model(model, d, keep).worst
            export_s = time.perf_counter() - t0
            onnx_image, onnx_pair = onnx_pipelines(d, images, ids, mask, args.threads)
            t = interleaved(
                {
                    "eager_image": eager_image,
                    "onnx_image": onnx_image,
                    "eager_pair": eager_pair,
                    "onnx_pair": onnx_pair,
                },
                args.runs,
                args.warmup,
            )
        row = {
            "keep_ratio": keep,
            "export_s": round(export_s, 1),
            "worst_onnx_abs_diff": worst,
            **{f"{k}_per_s": round(args.batch / v, 1) for k, v in t.items()},
        }
        rows.append(row)
        log.info("%s", row)
    load_avg = os.getloadavg()
    result = {
        "rows": rows,
        "batch": args.batch,
        "text_len": args.text_len,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "config": args.ckpt or args.config,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in load_avg],
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_onnx.json").write_text(json.dumps(result, indent=2))
    base = rows[0]
    lines = [
        "| keep ratio | ViT images/s eager | ONNX RT | ratio | pairs/s eager | ONNX RT | ratio | "
        "max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['keep_ratio']} | {r['eager_image_per_s']} | {r['onnx_image_per_s']} | "
            f"{r['onnx_image_per_s'] / r['eager_image_per_s']:.2f}x | {r['eager_pair_per_s']} | "
            f"{r['onnx_pair_per_s']} | {r['onnx_pair_per_s'] / r['eager_pair_per_s']:.2f}x | "
            f"{r['worst_onnx_abs_diff']:.1e} |"
        )
    lines.append("")
    lines.append(
        f"pruning speed-up (vs keep {base['keep_ratio']}): "
        + ", ".join(
            f"keep {r['keep_ratio']}: eager {r['eager_pair_per_s'] / base['eager_pair_per_s']:.2f}x, "
            f"ONNX {r['onnx_pair_per_s'] / base['onnx_pair_per_s']:.2f}x (pairs)"
            for r in rows[1:]
        )
    )
    (out / "bench_onnx.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

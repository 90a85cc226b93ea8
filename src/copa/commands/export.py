"""``copa export``: the parts a server needs, through ``torch.export`` and ONNX (``copa.export``).

    copa export --ckpt runs/demo/tasks/grounding --out runs/export/grounding [--keep-ratio 0.5]

Writes ``OUT/<part>.pt2``, ``OUT/<part>.onnx``, the tokenizer and ``OUT/manifest.json``; prints the
ONNX Runtime vs eager max abs difference per part. Exit status 1 when a part's difference exceeds
``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import logging

from copa.config import Config, ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser(
        "export", help="export model parts with torch.export and ONNX (dynamic batch), with parity"
    )
    add_common(p, out_default="runs/export")
    p.add_argument("--ckpt", required=True, help="COPA model directory, training run directory or hub id")
    p.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="keep ratio baked into the graphs (static K; default: the model's; 1.0 = unpruned)",
    )
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="torch.export programs only")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest acceptable |ONNX - eager|")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.export import PARTS, export_model
    from copa.model.copa import load

    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {args.keep_ratio} is outside (0, 1]")
    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else PARTS
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"--parts: unknown part(s) {unknown}; the parts are {', '.join(PARTS)}")
    if args.onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError(
                "ONNX export needs onnx, onnxscript and onnxruntime (pip install 'copa[export]'), "
                "or pass --no-onnx"
            ) from None
    report = export_model(
        load(args.ckpt), args.out, args.keep_ratio, onnx=args.onnx, parts=parts, opset=args.opset
    )
    key = "onnx_max_abs_diff" if args.onnx else "torch_export_max_abs_diff"
    summary = {
        "out": str(report.out),
        "max_abs_diff": {n: max(p[key].values()) for n, p in report.parts.items()},
    }
    print(json.dumps(summary, indent=2))
    worst = max(summary["max_abs_diff"].values(), default=0.0)
    if worst > args.tolerance:
        log.error("parity: max abs difference %.3g exceeds --tolerance %.3g", worst, args.tolerance)
        return 1
    return 0

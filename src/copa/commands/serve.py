"""``copa serve``: the web demo on a local port (``copa.serve``).

    copa serve --ckpt runs/demo            # a demo output: its pre-trained and fine-tuned models, examples
    copa serve --ckpt runs/pt/model --vqa runs/vqa --grounding runs/ground --caption runs/cap --port 8000

Binds 127.0.0.1 unless ``--host`` says otherwise (the server runs a model on uploads: exposing it is
a decision, not a default).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from copa.config import Config
from copa.errors import UserError

log = logging.getLogger(__name__)

DEMO_EXAMPLES = 8


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("serve", help="web demo: kept patches, answer, box, caption and speed for your images")
    add_common(p)
    p.add_argument(
        "--ckpt",
        required=True,
        help="model directory, training run, hub id, or a `copa demo` output (uses all its models)",
    )
    for task in ("vqa", "grounding", "caption"):
        p.add_argument(
            f"--{task}", default=None, metavar="CKPT", help=f"model fine-tuned for {task} (default: --ckpt's)"
        )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--examples", default=None, metavar="DIR", help="folder of example images to offer")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest upload accepted")
    p.add_argument(
        "--max-megapixels", type=float, default=24.0, help="largest image accepted (width x height)"
    )
    p.set_defaults(func=run)


def demo_layout(path: Path) -> dict[str, Path] | None:
    """The models and examples of a ``copa demo`` output directory, or None if ``path`` is not one."""
    if not (path / "tasks").is_dir() or not (path / "pretrain" / "model").is_dir():
        return None
    # COPA's own selector: the PTA stage after the shared trunk when the demo ran one
    base = path / "pta_copa" / "model"
    found = {"base": base if base.is_dir() else path / "pretrain" / "model"}
    for task in ("vqa", "grounding", "caption"):
        if (path / "tasks" / task / "model").is_dir():
            found[task] = path / "tasks" / task / "model"
    if (path / "data" / "images" / "test").is_dir():
        found["examples"] = path / "data" / "images" / "test"
    return found


def build_models(args: argparse.Namespace) -> tuple[object, list[Path]]:
    from copa.commands.predict import IMAGE_SUFFIXES, resolve_device
    from copa.predictor import Predictor
    from copa.serve import TaskModels

    device = resolve_device(args.device)
    demo = demo_layout(Path(args.ckpt)) or {}
    sources = {"base": str(demo.get("base", args.ckpt))}
    for task in ("vqa", "grounding", "caption"):
        chosen = getattr(args, task) or demo.get(task)
        if chosen:
            sources[task] = str(chosen)
    loaded: dict[str, Predictor] = {}

    def load(src: str) -> Predictor:
        if src not in loaded:
            loaded[src] = Predictor.from_pretrained(src, device=device, batch_size=4)
        return loaded[src]

    base = load(sources["base"])
    models = TaskModels(base, {t: load(s) for t, s in sources.items() if t != "base"}, sources)
    ex_dir = Path(args.examples) if args.examples else demo.get("examples")
    examples: list[Path] = []
    if ex_dir is not None:
        if not Path(ex_dir).is_dir():
            raise UserError(f"--examples {ex_dir}: no such folder")
        examples = sorted(p for p in Path(ex_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[
            :DEMO_EXAMPLES
        ]
    return models, examples


def run(args: argparse.Namespace, cfg: Config) -> int:
    import importlib.util

    have = {m: importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn")}
    have["python-multipart"] = any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart"))
    if not all(have.values()):
        missing = ", ".join(m for m, ok in have.items() if not ok)
        raise UserError(f"copa serve needs {missing} (pip install 'copa[serve]')")
    import uvicorn

    from copa.serve import ServeOptions, create_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise UserError("--max-upload-mb and --max-megapixels must be positive")
    models, examples = build_models(args)
    options = ServeOptions(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
        examples=examples,
    )
    app = create_app(models, options)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can run the model", args.host)
    log.info("COPA demo on http://%s:%d/ (Ctrl-C stops it)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

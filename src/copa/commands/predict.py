"""``copa predict TASK``: ask a saved model about your own images from the shell; JSON lines out.

    copa predict vqa --ckpt runs/demo/tasks/vqa --image a.png --question "what color is the circle?"
    copa predict caption --ckpt runs/demo/tasks/caption --image photos/ --out captions.jsonl
    copa predict grounding --ckpt runs/demo/tasks/grounding --image list.json --text "the red circle"
    copa predict retrieval --ckpt runs/demo/tasks/retrieval --image photos/ --text "a red circle" --k 5
    copa predict kept --ckpt runs/demo/tasks/vqa --image a.png --text "the red circle" --text "the star"

``--image`` (repeatable) is an image file, a folder (its images, sorted) or a JSON list whose
entries are paths or ``{"image": path, "question" | "text": str}`` (paths relative to the list).
An entry's own text wins over ``--question`` / ``--text``; otherwise each image is paired with each
given text. An image that cannot be read is skipped, logged and counted; the rest are predicted.
The JSON lines go to ``--out`` (default ``-``: stdout); the counts to the log (stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from copa.config import Config, ConfigError
from copa.errors import UserError

log = logging.getLogger(__name__)

TASKS = ("vqa", "caption", "grounding", "retrieval", "kept")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHUNK = 64  # images opened at a time (retrieval opens the whole gallery)


@dataclass
class Item:
    """One image to predict on, with the text its source gave it (None: use the flags')."""

    image: str
    text: str | None = None


def register(sub: argparse._SubParsersAction) -> None:
    from copa.cli import add_common

    p = sub.add_parser("predict", help="predict with a saved model on your own images (JSON lines)")
    p.add_argument("task", choices=TASKS, help="what to predict (kept: the patches the selection keeps)")
    add_common(p, out_default="-")
    p.add_argument("--ckpt", required=True, help="COPA model directory, training run directory or hub id")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        required=True,
        metavar="PATH",
        help="image file, folder of images, or JSON list (repeatable)",
    )
    p.add_argument("--question", action="append", default=[], help="vqa: question (repeatable)")
    p.add_argument(
        "--text",
        action="append",
        default=[],
        help="grounding / kept: phrase; retrieval: query text (repeatable)",
    )
    p.add_argument(
        "--keep-ratio", type=float, default=None, help="keep ratio (1.0 = unpruned; default: the model's)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=5, help="retrieval: images per text")
    p.add_argument("--decode", choices=["greedy", "beam"], default=None, help="vqa / caption decoding")
    p.add_argument(
        "--answer-list",
        default=None,
        metavar="FILE",
        help="vqa: rank the answers of this JSON list instead of generating",
    )
    p.set_defaults(func=run)


# ------------------------------------------------------------------ inputs
def expand_inputs(specs: list[str]) -> list[Item]:
    """``--image`` values -> items. Raises ``UserError`` for a path that names nothing usable."""
    items: list[Item] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(
                    f"--image {spec}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            items += [Item(str(p)) for p in found]
        elif path.suffix.lower() == ".json":
            items += _read_list(path)
        elif path.exists() or path.suffix.lower() in IMAGE_SUFFIXES:
            items.append(Item(str(path)))  # a missing file is skipped and counted like an unreadable one
        else:
            raise UserError(f"--image {spec}: no such file or folder")
    return items


def _read_list(path: Path) -> list[Item]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--image {path}: not a JSON list ({e})") from None
    if not isinstance(data, list) or not data:
        raise UserError(
            f'--image {path}: expected a non-empty JSON list of paths or {{"image": ...}} entries'
        )
    out = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise UserError(f"--image {path}: entry {i} is neither a path nor an object with an 'image' path")
        text = entry.get("question", entry.get("text"))
        image = Path(entry["image"])
        out.append(
            Item(
                str(image if image.is_absolute() else path.parent / image),
                text if isinstance(text, str) and text.strip() else None,
            )
        )
    return out


def resolve_device(name: str) -> Any:
    import torch

    from copa.utils.device import default_device

    if name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ------------------------------------------------------------------ running
class Opener:
    """Opens images, counting the ones that cannot be used by kind (``ImageError.kind``)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()

    def open(self, items: list[Item]) -> list[tuple[Item, Any]]:
        from copa.preprocess import ImageError, open_image

        good = []
        for it in items:
            try:
                good.append((it, open_image(it.image)))
            except ImageError as e:
                log.warning("skipped %s: %s", it.image, e)
                self.skipped[e.kind] += 1
        return good


def _chunks(items: list[Item], n: int) -> Iterator[list[Item]]:
    for s in range(0, len(items), n):
        yield items[s : s + n]


def _texts(task: str, args: argparse.Namespace) -> list[str]:
    return [t for t in (args.question if task == "vqa" else args.text) if t.strip()]


def _pairs(good: list[tuple[Item, Any]], flags: list[str]) -> list[tuple[Item, Any, str]]:
    return [(it, im, t) for it, im in good for t in ([it.text] if it.text else flags)]


def predict_lines(
    predictor: Any, task: str, items: list[Item], args: argparse.Namespace, opener: Opener
) -> Iterator[dict[str, Any]]:
    """One JSON-able dict per prediction (see the module docstring)."""
    from tqdm import tqdm

    kw = {"keep_ratio": args.keep_ratio}
    flags = _texts(task, args)
    if task == "retrieval":
        good = opener.open(items)
        if good:
            res = predictor.retrieve([im for _, im in good], flags, k=args.k, **kw)
            for t, top in zip(flags, res.top_images(args.k), strict=True):
                yield {"text": t, "top": [{"image": good[i][0].image, "score": round(s, 4)} for i, s in top]}
        return
    answers = None
    if args.answer_list:
        answers = _answer_list(args.answer_list)
    bar = tqdm(total=len(items), desc=f"predict {task}", unit="img", disable=None, file=sys.stderr)
    for chunk in _chunks(items, CHUNK):
        good = opener.open(chunk)
        bar.update(len(chunk))
        if not good:
            continue
        if task == "caption":
            caps = predictor.caption([im for _, im in good], decode=args.decode, **kw)
            for (it, _), c in zip(good, caps, strict=True):
                yield {"image": it.image, "caption": c}
            continue
        pairs = _pairs(good, flags)
        if not pairs:
            continue
        imgs, texts = [im for _, im, _ in pairs], [t for _, _, t in pairs]
        if task == "vqa":
            out = predictor.answer(imgs, texts, decode=args.decode, answer_list=answers, **kw)
            for (it, _, q), a in zip(pairs, out, strict=True):
                yield {"image": it.image, "question": q, "answer": a}
        elif task == "grounding":
            for (it, im, t), box in zip(pairs, predictor.ground(imgs, texts, **kw), strict=True):
                yield {"image": it.image, "text": t, **box.to_dict(), "image_size": list(im.size)}
        else:  # kept
            for (it, _, t), kept in zip(pairs, predictor.kept_patches(imgs, texts, **kw), strict=True):
                yield {"image": it.image, "text": t, "grid": predictor.grid, "kept": kept}
    bar.close()


def _answer_list(path: str) -> list[str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--answer-list {path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"--answer-list {path}: expected a non-empty JSON list of answers")
    return [str(a) for a in data]


def check_args(args: argparse.Namespace, items: list[Item]) -> None:
    """The user mistakes that can be told before loading a model; ``UserError`` for each."""
    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {args.keep_ratio} is outside (0, 1]")
    if args.batch_size < 1 or args.k < 1:
        raise UserError("--batch-size and --k must be at least 1")
    task, flags = args.task, _texts(args.task, args)
    if task == "vqa" and args.text and not args.question:
        raise UserError("vqa takes --question, not --text")
    if task in ("vqa", "grounding") and not flags and not all(it.text for it in items):
        what = "--question" if task == "vqa" else "--text"
        raise UserError(f"{task} needs {what} (or a {what[2:]} in every entry of a JSON list)")
    if task == "retrieval" and not flags:
        raise UserError("retrieval needs at least one --text to search the images for")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from copa.predictor import Predictor

    items = expand_inputs(args.image)
    check_args(args, items)
    device = resolve_device(args.device)
    predictor = Predictor.from_pretrained(args.ckpt, device=device, batch_size=args.batch_size)
    trained_for = {"kept": None}.get(args.task, args.task)
    if trained_for and predictor.task != trained_for:
        what = f"was fine-tuned for {predictor.task}" if predictor.task else "is a pre-trained model"
        log.warning(
            "%s %s, not for %s: its %s output has not learned the task", args.ckpt, what, args.task, args.task
        )
    opener = Opener()
    n = 0
    sink = nullcontext(sys.stdout) if args.out in (None, "-") else _open_out(args.out)
    with sink as f:
        for line in predict_lines(predictor, args.task, items, args, opener):
            _write(f, line)
            n += 1
    skipped = sum(opener.skipped.values())
    log.info(
        "predict %s: %d prediction(s) for %d image(s); %d image(s) skipped %s%s",
        args.task,
        n,
        len(items) - skipped,
        skipped,
        dict(opener.skipped) if skipped else "",
        "" if args.out in (None, "-") else f"; wrote {args.out}",
    )
    if skipped == len(items):
        raise UserError(f"no readable image among the {len(items)} given ({dict(opener.skipped)})")
    return 0


def _open_out(path: str) -> IO[str]:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p.open("w", encoding="utf-8")


def _write(f: IO[str], line: dict[str, Any]) -> None:
    f.write(json.dumps(line) + "\n")
    f.flush()

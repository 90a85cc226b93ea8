"""Linear probe of what a trained ViT's output tokens say about the objects in the image.

For every object of the synthetic scenes (COCO instances of a ``copa data synth`` directory) it takes
the ViT's output token (after the final norm, unpruned: what the fusion reads) at the patch under the
object's centre, trains a linear and an MLP classifier per attribute (colour, shape, size) on the
objects of the first training images (``train_all_boxes.json``: every object boxed) and reports
validation accuracy beside the majority class. It costs seconds, so trunk variants can be compared
without a VQA fine-tune (BENCHMARKS.md, "Why VQA stops at ~40%: the trunk never learns shape").

    python scripts/feature_probe.py --data runs/demo/data --model runs/demo/pretrain/model
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from copa.model.copa import COPAModel, load

log = logging.getLogger("feature_probe")
ATTRIBUTES = ("size", "colour", "shape")


def objects(records: Path, limit: int) -> tuple[list[Path], list[tuple[int, list[float], list[str]]]]:
    """(image paths, [(image index, box xywh, [size, colour, shape])]) of the first ``limit`` records
    of a records file that has every object boxed (``train_all_boxes.json``, ``val.json``)."""
    recs = json.loads(records.read_text())[:limit]
    objs = [(k, o["box"], o["phrase"].split()[-3:]) for k, r in enumerate(recs) for o in r["objects"]]
    return [records.parent / r["image"] for r in recs], objs


@torch.no_grad()
def features(model: COPAModel, paths: list[Path], objs: list, batch: int = 64) -> torch.Tensor:
    """(O, D) output tokens at each object's centre patch."""
    tf = model.image_transform
    size, grid = model.vision.cfg.image_size, model.grid
    tokens = []
    for i in range(0, len(paths), batch):
        imgs = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
        tokens.append(model.vision(imgs, None, [1.0] * len(model.keep_ratios)).tokens[:, 1:].float())
    tok = torch.cat(tokens)
    out = []
    for img, (x, y, w, h), _ in objs:
        width = Image.open(paths[img]).size[0]
        s = size / width
        col = min(int((x + w / 2) * s * grid / size), grid - 1)
        row = min(int((y + h / 2) * s * grid / size), grid - 1)
        out.append(tok[img, row * grid + col])
    return torch.stack(out)


def probe(
    xtr: torch.Tensor, ytr: list[str], xva: torch.Tensor, yva: list[str], hidden: int = 0
) -> tuple[float, float]:
    """(validation accuracy of a linear classifier (``hidden`` 0) or a one-hidden-layer MLP, of the
    training majority class)."""
    classes = sorted(set(ytr))
    cid = {c: k for k, c in enumerate(classes)}
    ttr = torch.tensor([cid[c] for c in ytr])
    tva = torch.tensor([cid.get(c, -1) for c in yva])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(0)
    d = xtr.shape[1]
    lin: torch.nn.Module = torch.nn.Linear(d, len(classes))
    if hidden:
        lin = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, len(classes))
        )
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xtr), ttr).backward()
        opt.step()
    acc = (lin(xva).argmax(-1) == tva).float().mean().item()
    major = cid[Counter(ytr).most_common(1)[0][0]]
    return acc, (tva == major).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a `copa data synth` directory")
    ap.add_argument("--model", required=True, help="a saved model (or training run) directory")
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--val-images", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(True)
    model = load(args.model)
    data = Path(args.data)
    ptr, otr = objects(data / "train_all_boxes.json", args.train_images)
    pva, ova = objects(data / "val.json", args.val_images)
    xtr, xva = features(model, ptr, otr), features(model, pva, ova)
    result = {}
    for a, name in enumerate(ATTRIBUTES):
        ytr, yva = [o[2][a] for o in otr], [o[2][a] for o in ova]
        acc, major = probe(xtr, ytr, xva, yva)
        mlp, _ = probe(xtr, ytr, xva, yva, hidden=256)
        result[name] = {"linear": round(acc, 3), "mlp": round(mlp, 3), "majority": round(major, 3)}
        log.info("%-6s linear probe %.3f, MLP probe %.3f (majority %.3f)", name, acc, mlp, major)
    print(json.dumps({"model": args.model, "objects": [len(otr), len(ova)], **result}))


if __name__ == "__main__":
    main()

"""``copa data synth|shard|check``: make the synthetic set, write webdataset shards, audit a source."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch

from copa.config import Config

log = logging.getLogger(__name__)


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True))  # the CLI's one final JSON summary


def cmd_synth(args: argparse.Namespace, cfg: Config) -> int:
    from copa.data.synth import write_synth
    from copa.data.synth_alt import write_synth_alt

    seed = cfg.seed if args.seed is None else args.seed
    if args.style == "alt":  # evaluation only: a test split, every box kept
        summary = write_synth_alt(args.out, seed=seed, n_test=args.n_test)
        summary["out"] = str(args.out)
        _print(summary)
        return 0
    summary = write_synth(
        args.out,
        seed=seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        box_share=cfg.data.box_share if args.box_share is None else args.box_share,
        n_captions=args.captions,
    )
    summary["out"] = str(args.out)
    _print(summary)
    return 0


def cmd_shard(args: argparse.Namespace, cfg: Config) -> int:
    from copa.data.badinput import DataReport
    from copa.data.readers import read_records
    from copa.data.shards import write_shards

    if not args.out:
        log.error("copa data shard needs --out DIR")
        return 2
    records = read_records(args.src, args.format or cfg.data.format, args.image_root or cfg.data.image_root)
    report = (
        DataReport().merge(records.report)
        if records.report is not None
        else DataReport(records_in=len(records), records_out=len(records))
    )
    unreadable = report.counts["missing_file"]
    paths = write_shards(records, args.out, shard_size=args.shard_size, report=report)
    report.records_out -= report.counts["missing_file"] - unreadable  # records whose image could not be read
    _print({"shards": len(paths), "out": str(args.out), "records": report.summary()})
    return 0


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    from copa.data.badinput import validate_records
    from copa.data.patch_labels import box_to_patch_labels, union_labels
    from copa.data.readers import read_records

    records = read_records(args.src, args.format or cfg.data.format, args.image_root or cfg.data.image_root)
    good, report = validate_records(records, cfg.data, decode=args.decode)  # the limits of the config
    size, patch = cfg.model.vision.image_size, cfg.model.vision.patch_size
    n = (size // patch) ** 2
    shares = []
    for r in good:
        if not r.objects or not r.width or not r.height:
            continue
        sx, sy = size / r.width, size / r.height
        boxes = torch.tensor([o.box for o in r.objects]) * torch.tensor([sx, sy, sx, sy])
        shares.append(
            union_labels(box_to_patch_labels(boxes, (size, size), patch, cfg.data.patch_tau), n).mean()
        )
    summary = {
        "records": report.summary(),
        "with_boxes": len(shares),
        "captions": sum(len(r.captions) for r in good),
        "questions": sum(len(r.questions) for r in good),
        "refs": sum(len(r.refs) for r in good),
        "patch_share_positive": round(float(torch.stack(shares).mean()), 4) if shares else None,
        "image_size": size,
        "patch_size": patch,
    }
    _print(summary)
    return 0


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="JSON list, COCO captions file/dir, VG file or shards")
    p.add_argument("--format", default=None, help="auto | json | coco | vg | wds (default: data.format)")
    p.add_argument("--image-root", default=None, help="image root (default: data.image_root)")


def register(subparsers: Any) -> None:
    from copa.cli import add_common

    data = subparsers.add_parser("data", help="make, convert and check data sets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("synth", help="write the embedded synthetic scenes (JSON + COCO + PNG)")
    add_common(p, out_default="data/synth")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--box-share", type=float, default=None, help="default: data.box_share")
    p.add_argument(
        "--captions",
        type=int,
        default=3,
        choices=(3, 4, 5),
        help="captions per image (default 3; 5 as COCO: a retrieval gallery of 5 captions an image)",
    )
    p.add_argument(
        "--style",
        choices=("main", "alt"),
        default="main",
        help="alt: a test split in a second look (other backgrounds, shades, tilts, sizes, 1-5 "
        "objects; copa.data.synth_alt) to evaluate on data the training generator never makes",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shard", help="write webdataset .tar shards from any reader")
    add_common(p)
    _source_args(p)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("check", help="validate a source; report bad input and patch coverage")
    add_common(p)
    _source_args(p)
    p.add_argument("--decode", action="store_true", help="decode every image (finds truncated files)")
    p.set_defaults(func=cmd_check)

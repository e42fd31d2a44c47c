"""``python -m data``: prepare shard sets and inspect them. Errors are one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write a shard set").add_subparsers(dest="source", required=True)

    shapes = prep.add_parser("shapes", help="the synthetic shapes benchmark (train/val shards + manifest.json)")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--num-samples", type=int, required=True, help="train + val samples")
    shapes.add_argument("--resolution", type=int, default=64, help="canvas side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    shapes.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    shapes.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in val (default 0.1)")

    emoji = prep.add_parser("emoji", help="Noto Color Emoji rendered with their names (train/val + manifest.json)")
    emoji.add_argument("--out", required=True, help="output folder")
    emoji.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    emoji.add_argument("--val-fraction", type=float, default=0.05, help="share of emoji in val (default 0.05)")
    emoji.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    emoji.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    emoji.add_argument("--font", help="TrueType font (default: Debian fonts-noto-color-emoji's NotoColorEmoji.ttf)")
    emoji.add_argument("--as-folder", action="store_true",
                       help="write OUT/train and OUT/val as folders of STEM.png + STEM.txt (caption), the input of "
                            "`prepare folder`, instead of shards (python -m demo emoji starts from it)")

    folder = prep.add_parser("folder", help="images with same-stem .txt captions, or --captions CSV/JSONL")
    folder.add_argument("--src", required=True, help="folder of images (searched recursively)")
    folder.add_argument("--out", required=True, help="output folder for the shards")
    folder.add_argument("--captions", help="CSV (path,caption) or JSONL ({path, caption}); paths relative to --src")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")

    insp = sub.add_parser("inspect", help="print one JSON summary of the shards matching PATTERN")
    insp.add_argument("pattern", help="brace pattern, glob, path or pipe: url; several joined with '::'")
    insp.add_argument("--caption-key", default="txt")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from data.errors import os_error
    from data.prepare import (inspect_shards, prepare_emoji, prepare_emoji_folder, prepare_folder,  # after argparse
                              prepare_shapes)

    def progress(msg: str) -> None:
        print(f"wrote {msg}", file=sys.stderr)

    def skipped(msg: str) -> None:
        print(f"skipped {msg}", file=sys.stderr)

    try:
        if args.command == "inspect":
            result = inspect_shards(args.pattern, caption_key=args.caption_key)
        elif args.source == "shapes":
            m = prepare_shapes(args.out, args.num_samples, resolution=args.resolution, seed=args.seed,
                               shard_size=args.shard_size, val_fraction=args.val_fraction, progress=progress)
            result = {"out": args.out, "counts": m["counts"], "splits": m["splits"]}
        elif args.source == "emoji" and args.as_folder:
            m = prepare_emoji_folder(args.out, resolution=args.resolution, val_fraction=args.val_fraction,
                                     seed=args.seed, font=args.font, progress=progress)
            result = {"out": args.out, "candidates": m["candidates"], "counts": m["counts"], "skipped": m["skipped"],
                      "splits": {split: f"{args.out}/{split}" for split in m["counts"]}}
        elif args.source == "emoji":
            m = prepare_emoji(args.out, resolution=args.resolution, val_fraction=args.val_fraction, seed=args.seed,
                              shard_size=args.shard_size, font=args.font, progress=progress)
            result = {"out": args.out, "candidates": m["candidates"], "counts": m["counts"],
                      "skipped": m["skipped"], "splits": m["splits"]}
        else:
            result = prepare_folder(args.src, args.out, captions=args.captions, shard_size=args.shard_size,
                                    progress=progress, skipped=skipped)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder under a regular file, a full disk, a folder without permission...
        print(f"error: {os_error(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0

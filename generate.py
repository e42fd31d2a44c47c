#!/usr/bin/env python
"""Prompts in, ranked images out.

    python generate.py --bundle DIR "a small red circle in the top left on a blue background" --candidates 16 --keep 4 \
        --out OUTDIR

writes OUTDIR/grid.png (one row per prompt, best first, the prompt written to the left of its row and each image's CLIP
score under it; --bare-grid: the images alone), OUTDIR/PROMPT-INDEX_RANK.png and OUTDIR/results.json.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--bundle", help="folder with vqgan/, bart_prior/, clip_rank/")
    p.add_argument("--vqgan", help="override the bundle's VQGAN folder")
    p.add_argument("--bart-prior", "--prior", dest="bart_prior", help="override the bundle's prior folder")
    p.add_argument("--clip-rank", "--clip", dest="clip_rank",
                   help="override the bundle's CLIP: an open_clip folder, or a checkpoint file with --clip-arch")
    p.add_argument("--clip-arch", help="the open_clip architecture of a --clip-rank checkpoint file, e.g. ViT-B-32")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--condition-scale", type=float, default=None, help="default: the prior's own (set at training)")
    p.add_argument("--temperature", type=float, default=None, help="default: the prior's own (set at training)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="candidates sampled, decoded and scored at a time")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the prior's matrix products; auto = bf16 on CUDA with bf16 and on AVX512-bf16 CPUs")
    p.add_argument("--rank-shifts", type=int, default=0,
                   help="average CLIP's score over the image and its translations by up to N pixels (1 + 8N views; "
                        "0 = the image alone): steadier scores for small details, at 1 + 8N times the CLIP cost")
    p.add_argument("--no-rank", action="store_true", help="keep the first K candidates, no CLIP")
    p.add_argument("--device", default=None)
    p.add_argument("--bare-grid", action="store_true",
                   help="grid.png without the prompts beside the rows and the CLIP scores under the images")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from core.errors import UserError

    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # a prompt's warning (empty, truncated): one line naming it
            return _generate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output file that cannot be written: a full disk, no permission
        from data.errors import os_error

        print(f"error: {os_error(exc)}", file=sys.stderr)
        return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    # through tqdm: on a line of its own, not inside the progress bar
    tqdm.write(f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def _check_args(args: argparse.Namespace) -> str | None:
    """The first command-line value out of range, as one line; None when all are usable."""
    for flag, value, least in (("--candidates", args.candidates, 1), ("--keep", args.keep, 1),
                               ("--batch-size", args.batch_size, 1), ("--rank-shifts", args.rank_shifts, 0),
                               ("--top-k", args.top_k, 1)):
        if value is not None and value < least:
            return f"{flag} must be at least {least}, got {value}"
    if args.keep > args.candidates:
        return f"--keep {args.keep} is more than --candidates {args.candidates}"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"
    if args.condition_scale is not None and not math.isfinite(args.condition_scale):
        return f"--condition-scale must be a finite number, got {args.condition_scale}"
    from data.errors import blocking_file

    blocking = blocking_file(args.out)
    if blocking:
        return f"--out {args.out}: {blocking} is a file, not a folder"
    return None


def _generate(args: argparse.Namespace) -> int:
    from core.files import write_json
    from pipeline import Pipeline, labelled_grid, make_grid, save_png

    pipe = Pipeline.from_pretrained(args.bundle, vqgan=args.vqgan, bart_prior=args.bart_prior,
                                    clip_rank=args.clip_rank, device=args.device, load_clip=not args.no_rank,
                                    clip_arch=args.clip_arch)
    rank = not args.no_rank and pipe.ranker is not None
    if not args.no_rank and not rank:
        print("error: no CLIP part in the bundle: pass --clip-rank DIR or --no-rank", file=sys.stderr)
        return 2
    results = pipe(args.prompts, num_candidates=args.candidates, keep=args.keep,
                   condition_scale=args.condition_scale, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, rank=rank,
                   precision=args.precision, rank_shifts=args.rank_shifts)
    os.makedirs(args.out, exist_ok=True)
    rows, records = [], []
    for i, (prompt, ranked) in enumerate(zip(args.prompts, results)):
        for r in ranked:
            name = f"{i:03d}_{r.rank:02d}.png"
            r.image.save(os.path.join(args.out, name))
            rows.append(torch.from_numpy(np.array(r.image)).permute(2, 0, 1))  # a copy: PIL's buffer is read-only
            records.append({"prompt": prompt, "prompt_index": i, "rank": r.rank, "candidate": r.candidate,
                            "seed": args.seed, "clip_score": r.score, "file": name})
    images, per_row = torch.stack(rows), len(results[0])
    if args.bare_grid:
        grid = make_grid(images, nrow=per_row)
    else:  # the row's label starts with the prompt index of the file names NNN_RR.png
        grid = labelled_grid(images, [f"{i:03d}  {prompt}" for i, prompt in enumerate(args.prompts)], nrow=per_row,
                             scores=[r["clip_score"] for r in records] if rank else None)
    save_png(grid, os.path.join(args.out, "grid.png"))
    settings = {k: v for k, v in vars(args).items() if k != "prompts"}
    for key in ("condition_scale", "temperature"):  # what was used: the bundle's stored default unless given
        settings[key] = getattr(pipe.prior.config, key) if settings[key] is None else settings[key]
    write_json(os.path.join(args.out, "results.json"), {"settings": settings, "results": records})
    print(os.path.join(args.out, "grid.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

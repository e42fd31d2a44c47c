"""End-to-end generation cost: seconds per prompt for 16 candidates (sampling, VQGAN decoding, CLIP ranking), with
the share of each stage, at the demo size and at DALL·E Mini's size (random weights: speed, not quality).

    python bench/generate.py [--sizes demo mini] [--candidates 16] [--scale 3] [--repeats 2] [--threads N]
                             [--rank-shifts N]

Ranking uses one CLIP view per image unless --rank-shifts N asks for 1 + 8N shifted views (generate.py's option).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from omegaconf import OmegaConf

from bart_prior import BartPrior, train_tokenizer
from bart_prior import preset as prior_preset
from clip_rank import ClipRanker, build_clip
from clip_rank.ranker import shift_offsets
from vqgan import VQGAN
from vqgan import preset as vq_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CLIP = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "configs/clip_rank/shapes.yaml")).model.arch)
SIZES = {  # (VQGAN preset, prior preset, CLIP)
    "demo": ("shapes", "shapes", {"arch": SHAPES_CLIP}),
    "mini": ("f16-16384", "mini", {"name": "ViT-B-32"}),
}
PROMPT = "a small red circle in the top left on a blue background"


def build(size: str, tok_dir: str):
    vq_name, prior_name, clip_kw = SIZES[size]
    vq = VQGAN(vq_preset(vq_name)).eval()
    tokenizer = train_tokenizer([PROMPT, "a large green cross in the center on a white background"] * 50,
                                vocab_size=300, out_dir=tok_dir, min_frequency=1)
    prior = BartPrior(prior_preset(prior_name, codebook_size=vq.codebook_size, grid=list(vq.grid)), tokenizer).eval()
    ranker = ClipRanker(build_clip(pretrained="scratch", **clip_kw), device="cpu")
    return vq, prior, ranker


def once(vq, prior, ranker, candidates: int, scale: float, shifts: int = 0) -> dict[str, float]:
    t0 = time.perf_counter()
    codes = prior.generate([PROMPT], num_candidates=candidates, condition_scale=scale, seed=0)[0]
    t1 = time.perf_counter()
    with torch.inference_mode():
        images = vq.decode(codes.view(-1, *vq.grid))
    t2 = time.perf_counter()
    scores = ranker.score(PROMPT, images, shifts=shifts)
    t3 = time.perf_counter()
    assert scores.shape == (candidates,)
    return {"sample": t1 - t0, "decode": t2 - t1, "rank": t3 - t2, "total": t3 - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank-shifts", type=int, default=0, help="CLIP test-time shift views (1 + 8N)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.candidates} candidates, "
          f"guidance scale {args.scale}, {len(shift_offsets(args.rank_shifts))} CLIP view(s) per image; median of "
          f"{args.repeats} runs after one warm-up")
    print("| size | params (VQGAN / prior / CLIP) | s per prompt | sampling | decoding | CLIP ranking |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tok:
            vq, prior, ranker = build(size, tok)
        params = [sum(x.numel() for x in m.parameters()) / 1e6 for m in (vq, prior, ranker.model)]
        options = (args.scale, args.rank_shifts)
        once(vq, prior, ranker, min(2, args.candidates), *options)  # warm-up
        runs = [once(vq, prior, ranker, args.candidates, *options) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        share = {k: 100 * med[k] / med["total"] for k in ("sample", "decode", "rank")}
        print(f"| {size} | {params[0]:.1f}M / {params[1]:.1f}M / {params[2]:.1f}M | {med['total']:.2f} | "
              f"{share['sample']:.0f}% | {share['decode']:.0f}% | {share['rank']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()

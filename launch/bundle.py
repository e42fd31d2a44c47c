"""Generation bundles: one folder holding the three trained parts, checked to fit together.

    BUNDLE/vqgan/       VQGAN.from_pretrained folder
    BUNDLE/bart_prior/  BartPrior.from_pretrained folder (with its tokenizer)
    BUNDLE/clip_rank/   ClipRanker.from_pretrained folder (open_clip local-dir format)
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from launch.config import ConfigError

PARTS = ("vqgan", "bart_prior", "clip_rank")


class BundleError(ConfigError):
    """A bundle part is missing or does not fit the others."""


def _part_dir(bundle: Optional[str], part: str, override: Optional[str]) -> str:
    path = override or (os.path.join(bundle, part) if bundle else None)
    if path is None:
        raise BundleError(f"no {part} given: pass a bundle folder or --{part.split('_')[0]} DIR")
    if not os.path.isdir(path):
        raise BundleError(f"{part} folder not found: {path} (train it, or point --{part.split('_')[0]} at a "
                          "save_pretrained folder)")
    return path


def check_fit(vqgan: Any, prior: Any, ranker: Any = None) -> None:
    """The prior must predict the VQGAN's codes on the VQGAN's token grid."""
    if prior.codebook_size != vqgan.codebook_size:
        raise BundleError(f"the prior predicts {prior.codebook_size} codes but the VQGAN has {vqgan.codebook_size}")
    if tuple(prior.grid) != tuple(vqgan.grid):
        raise BundleError(f"the prior writes a {tuple(prior.grid)} token grid but the VQGAN decodes "
                          f"{tuple(vqgan.grid)}")


def load_parts(bundle: Optional[str], vqgan: Optional[str] = None, prior: Optional[str] = None,
               clip: Optional[str] = None, need_clip: bool = False, device: str = "cpu", load_clip: bool = True):
    """Load (vqgan, prior, ranker); the ranker is None when the bundle has none and none is asked for, or with
    ``load_clip=False`` (unranked generation need not pay for loading CLIP)."""
    from bart_prior import BartPrior
    from clip_rank import ClipRanker
    from vqgan import VQGAN

    v = VQGAN.from_pretrained(_part_dir(bundle, "vqgan", vqgan))
    p = BartPrior.from_pretrained(_part_dir(bundle, "bart_prior", prior))
    check_fit(v, p)
    clip_dir = clip or (os.path.join(bundle, "clip_rank") if bundle else None)
    if not load_clip or clip_dir is None or (not need_clip and clip is None and not os.path.isdir(clip_dir)):
        return v, p, None
    return v, p, ClipRanker.from_pretrained(_part_dir(None, "clip_rank", clip_dir), device=device)


def assemble_bundle(vqgan: str, prior: str, clip: str, out: str) -> str:
    """Check that the parts fit, then copy them into ``out`` (written beside, renamed when complete)."""
    load_parts(None, vqgan=vqgan, prior=prior, clip=clip, need_clip=True)
    out = os.path.abspath(out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for part, src in zip(PARTS, (vqgan, prior, clip)):
        shutil.copytree(src, os.path.join(tmp, part))
    with open(os.path.join(tmp, "bundle.json"), "w") as fh:
        json.dump({"parts": {p: os.path.abspath(s) for p, s in zip(PARTS, (vqgan, prior, clip))}}, fh, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

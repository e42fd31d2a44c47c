"""Generation bundles: one folder holding the three trained parts, checked to fit together.

    BUNDLE/vqgan/        VQGAN.from_pretrained folder
    BUNDLE/bart_prior/   BartPrior.from_pretrained folder (with its tokenizer)
    BUNDLE/clip_rank/    ClipRanker.from_pretrained folder (open_clip local-dir format)
    BUNDLE/bundle.json   where each part came from
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

from core.errors import ModelFolderError
from core.files import atomic_folder, read_json, write_json

PARTS = ("vqgan", "bart_prior", "clip_rank")
FLAGS = {"vqgan": "--vqgan", "bart_prior": "--bart-prior", "clip_rank": "--clip-rank"}
SAMPLING_KEYS = ("condition_scale", "temperature")  # the prior's stored sampling defaults

# A bundle part that is missing or does not fit the others is a model-folder problem like any other.
BundleError = ModelFolderError


def _part_dir(bundle: Optional[str], part: str, override: Optional[str]) -> str:
    path = override or (os.path.join(bundle, part) if bundle else None)
    if path is None:
        raise ModelFolderError(f"no {part} given: pass a bundle folder or {FLAGS[part]} DIR")
    if not os.path.isdir(path):
        raise ModelFolderError(f"{part} folder not found: {path} (train it, or point {FLAGS[part]} at a "
                               "save_pretrained folder)")
    return path


def check_fit(vqgan: Any, prior: Any) -> None:
    """The prior must predict the VQGAN's codes on the VQGAN's token grid."""
    if prior.codebook_size != vqgan.codebook_size:
        raise ModelFolderError(f"the prior predicts {prior.codebook_size} codes but the VQGAN has "
                               f"{vqgan.codebook_size}")
    if tuple(prior.grid) != tuple(vqgan.grid):
        raise ModelFolderError(f"the prior writes a {tuple(prior.grid)} token grid but the VQGAN decodes "
                               f"{tuple(vqgan.grid)}")


def load_parts(bundle: Optional[str], vqgan: Optional[str] = None, bart_prior: Optional[str] = None,
               clip_rank: Optional[str] = None, need_clip: bool = False, device: str = "cpu",
               load_clip: bool = True, clip_arch: Optional[str] = None):
    """Load (vqgan, prior, ranker) from a bundle, each part replaceable by a folder of its own (``clip_rank`` may
    also be an open_clip checkpoint file of the architecture ``clip_arch``); the ranker is None when the bundle has
    none and none is asked for, or with ``load_clip=False`` (unranked generation need not pay for loading CLIP)."""
    from bart_prior import BartPrior
    from clip_rank import ClipRanker
    from vqgan import VQGAN

    v = VQGAN.from_pretrained(_part_dir(bundle, "vqgan", vqgan), device=device)
    p = BartPrior.from_pretrained(_part_dir(bundle, "bart_prior", bart_prior), device=device)
    check_fit(v, p)
    clip_dir = clip_rank or (os.path.join(bundle, "clip_rank") if bundle else None)
    if not load_clip or clip_dir is None or (not need_clip and clip_rank is None and not os.path.isdir(clip_dir)):
        return v, p, None
    if not os.path.isfile(clip_dir):
        clip_dir = _part_dir(None, "clip_rank", clip_dir)
    return v, p, ClipRanker.from_pretrained(clip_dir, device=device, arch=clip_arch)


def assemble_bundle(vqgan: str, bart_prior: str, clip_rank: str, out: str,
                    sampling: Optional[dict[str, float]] = None, clip_arch: Optional[str] = None) -> str:
    """Check that the parts fit, then copy them into ``out`` (atomically: the previous bundle stays whole until the
    new one is complete). ``clip_rank`` is an open_clip folder, or an open_clip checkpoint file of the architecture
    ``clip_arch`` (written into the bundle as a folder). ``sampling``: defaults to store in the bundle's prior
    (``condition_scale``, ``temperature``), which generate.py and the Pipeline use when not told otherwise."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ModelFolderError(f"unknown sampling default '{unknown[0]}'; choose from {', '.join(SAMPLING_KEYS)}")
    sources = dict(zip(PARTS, (vqgan, bart_prior, clip_rank)))
    _, _, ranker = load_parts(None, need_clip=True, clip_arch=clip_arch, **sources)
    with atomic_folder(out) as tmp:
        for part, src in sources.items():
            if os.path.isfile(src):  # an open_clip checkpoint file: the bundle holds the folder format
                ranker.save_pretrained(os.path.join(tmp, part))
            else:
                shutil.copytree(src, os.path.join(tmp, part))
        if sampling:
            config_path = os.path.join(tmp, "bart_prior", "config.json")
            write_json(config_path, read_json(config_path) | {k: float(v) for k, v in sampling.items()})
        write_json(os.path.join(tmp, "bundle.json"),
                   {"parts": {p: os.path.abspath(s) for p, s in sources.items()}, "sampling": sampling})
    return os.path.abspath(out)


__all__ = ["BundleError", "PARTS", "SAMPLING_KEYS", "assemble_bundle", "check_fit", "load_parts"]

"""Text -> image: the prior samples code sequences, the VQGAN decodes them, CLIP ranks them.

A bundle is a folder with ``vqgan/``, ``bart_prior/`` and ``clip_rank/`` subfolders, each a ``from_pretrained``
folder (see launch/bundle.py, which assembles and checks them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from launch.bundle import load_parts
from launch.images import to_uint8

log = logging.getLogger(__name__)

# Test-time shift views for CLIP ranking (clip_rank.ClipRanker): the image and its translations by 1 and 2 pixels,
# 17 views. On five demo bundles (384 prompts x 16 candidates each) they lifted the ranking gain over a random
# candidate from +5.6 to +9.3 points on average (README, demo, session 11), for 17x the image-tower cost: at the demo
# size ~0.3 s per prompt of 16 candidates on 2 CPU threads, next to ~1.1 s of sampling them. 0 = one view.
RANK_SHIFTS = 2

# Weight of the prior's own log-likelihood in the ranking (rank_scores): z(CLIP) + weight x z(log p at the sampling
# temperature). Off by default, CLIP alone ranks as in DALL-E Mini: on six demo bundles (384 prompts x 16 candidates,
# 17 CLIP views) weight 0.25 changed the ranking gain over a random candidate by -1.3 to +3.6 points, +0.9 on
# average, and by -0.4 on average on the three bundles not used to choose it (README, demo, session 13).
PRIOR_WEIGHT = 0.0


@dataclass
class GeneratedImage:
    image: Image.Image
    score: Optional[float]  # CLIP cosine similarity with the prompt (None with rank=False)
    candidate: int  # index among the prompt's candidates; with the seed it reproduces the image
    rank: int  # 0 = best
    log_likelihood: Optional[float] = None  # the prior's log p(codes | prompt) (None unless it took part in ranking)
    rank_score: Optional[float] = None  # what the ranking sorted by (rank_scores)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as the ``(image, score)`` pair of the pipeline's contract: ``for image, score in pipe(p)[0]``."""
        return iter((self.image, self.score))


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-8)


def rank_scores(clip_scores: torch.Tensor, log_likelihood: Optional[torch.Tensor] = None,
                prior_weight: float = PRIOR_WEIGHT) -> torch.Tensor:
    """One prompt's candidates -> the scores they are ranked by, best highest.

    CLIP's cosine alone, or with the prior's log-likelihood ``z(clip) + prior_weight x z(log_likelihood)``, each
    z-scored over the prompt's candidates so that the weight does not depend on either scale."""
    if log_likelihood is None or prior_weight == 0 or clip_scores.numel() < 2:
        return clip_scores
    return _zscore(clip_scores.float()) + prior_weight * _zscore(log_likelihood.float())


def _item(x: Optional[torch.Tensor], i: int) -> Optional[float]:
    return None if x is None else float(x[i])


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images)]


class Pipeline:
    def __init__(self, vqgan, prior, ranker, device: Optional[str] = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vqgan = vqgan.to(self.device).eval()
        self.prior = prior.to(self.device).eval()
        self.ranker = ranker  # a ClipRanker is placed on its device when loaded

    @classmethod
    def from_pretrained(cls, bundle: Optional[str] = None, vqgan: Optional[str] = None, prior: Optional[str] = None,
                        clip: Optional[str] = None, device: Optional[str] = None,
                        load_clip: bool = True) -> "Pipeline":
        """Load a bundle; ``vqgan``/``prior``/``clip`` folders override (or replace) its parts. ``load_clip=False``
        skips the ranker (for ``rank=False`` generation)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        v, p, c = load_parts(bundle, vqgan=vqgan, prior=prior, clip=clip, device=device, load_clip=load_clip)
        return cls(v, p, c, device=device)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """(N, h*w) codes -> (N, 3, H, W) images in [-1, 1]; always fp32 (bf16 visibly bands the colours)."""
        h, w = self.prior.grid
        out = []
        for chunk in codes.split(batch_size):
            out.append(self.vqgan.decode(chunk.to(self.device).view(-1, h, w)).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str] | str, num_candidates: int = 16, keep: int = 4,
                 condition_scale: Optional[float] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0, batch_size: int = 16, rank: bool = True,
                 progress: bool = True, precision: str = "auto", rank_shifts: int = RANK_SHIFTS,
                 prior_weight: float = PRIOR_WEIGHT) -> list[list[GeneratedImage]]:
        """For each prompt, ``keep`` images, best ranked first (or the first ``keep`` with ``rank=False``).

        Ranking: CLIP's cosine with the prompt, plus ``prior_weight`` x the prior's log-likelihood of the candidate's
        codes at the sampling temperature (both z-scored over the prompt's candidates; see ``rank_scores``; 0 = CLIP
        alone). ``rank_shifts``: CLIP scores are averaged over the image and its translations by up to this many
        pixels (1 + 8 x rank_shifts views; 0 = the image alone).
        ``precision``: the prior's matrix products in "bf16" or "fp32"; "auto" = bf16 where the device is fast at
        it (CUDA with bf16, AVX512-bf16 CPUs). The VQGAN always decodes in fp32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if rank and self.ranker is None:
            raise ValueError("ranking needs a CLIP part; pass rank=False to keep the first candidates")
        keep = min(keep, num_candidates)
        # None: the prior's own defaults (the demo stores its measured best in the bundle)
        kwargs = dict(condition_scale=condition_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                      batch_size=batch_size, precision=precision)
        results = []
        for prompt in tqdm(prompts, desc="prompts", disable=not progress):
            codes = self.prior.generate([prompt], num_candidates=num_candidates, seed=seed, **kwargs)[0]
            images = self.decode(codes, batch_size)
            scores = loglik = ranked = None
            if rank:
                scores = torch.cat([self.ranker.score([prompt] * len(c), c, shifts=rank_shifts)
                                    for c in images.split(batch_size)])
                if prior_weight and num_candidates > 1:
                    loglik = self.prior.log_likelihood([prompt], codes[None], temperature=temperature,
                                                       batch_size=batch_size, precision=precision)[0]
                ranked = rank_scores(scores, loglik, prior_weight)
            order = ranked.argsort(descending=True)[:keep].tolist() if rank else list(range(keep))
            pil = _to_pil(images[order])
            results.append([GeneratedImage(pil[r], _item(scores, i), i, r, _item(loglik, i), _item(ranked, i))
                            for r, i in enumerate(order)])
        return results

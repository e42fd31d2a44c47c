"""Text -> image: the prior samples code sequences, the VQGAN decodes them, CLIP ranks them.

A bundle is a folder with ``vqgan/``, ``bart_prior/`` and ``clip_rank/`` subfolders, each a ``from_pretrained``
folder (see pipeline/bundle.py, which assembles and checks them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.bundle import check_fit, load_parts
from pipeline.images import to_uint8


@dataclass
class GeneratedImage:
    image: Image.Image
    score: Optional[float]  # CLIP cosine similarity with the prompt (None with rank=False)
    candidate: int  # index among the prompt's candidates; with the seed it reproduces the image
    rank: int  # 0 = best

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as the ``(image, score)`` pair of the pipeline's contract: ``for image, score in pipe(p)[0]``."""
        return iter((self.image, self.score))


def _item(x: Optional[torch.Tensor], i: int) -> Optional[float]:
    return None if x is None else float(x[i])


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images)]


class Pipeline:
    """The three parts, checked to fit (the prior writes the VQGAN's codes on its grid); ``ranker`` may be None for
    unranked generation."""

    def __init__(self, vqgan, prior, ranker=None, device: Optional[str] = None):
        check_fit(vqgan, prior)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vqgan = vqgan.to(self.device).eval()
        self.prior = prior.to(self.device).eval()
        self.ranker = ranker  # a ClipRanker is placed on its device when loaded

    @classmethod
    def from_pretrained(cls, bundle: Optional[str] = None, vqgan: Optional[str] = None,
                        bart_prior: Optional[str] = None, clip_rank: Optional[str] = None,
                        device: Optional[str] = None, load_clip: bool = True, *, clip_arch: Optional[str] = None,
                        prior: Optional[str] = None, clip: Optional[str] = None) -> "Pipeline":
        """Load a bundle; ``vqgan``/``bart_prior``/``clip_rank`` folders override (or replace) its parts
        (``prior``/``clip`` are their older names); ``clip_rank`` may be an open_clip checkpoint file of the
        architecture ``clip_arch``. ``load_clip=False`` skips the ranker (for ``rank=False`` generation)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        v, p, c = load_parts(bundle, vqgan=vqgan, bart_prior=bart_prior or prior, clip_rank=clip_rank or clip,
                             device=device, load_clip=load_clip, clip_arch=clip_arch)
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
                 condition_scale: Optional[float] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0, batch_size: int = 16,
                 rank: bool = True, progress: bool = True, precision: str = "auto",
                 rank_shifts: int = 0) -> list[list[GeneratedImage]]:
        """For each prompt, ``keep`` images, best ranked first (or the first ``keep`` with ``rank=False``).

        Ranking: CLIP's cosine with the prompt; ``rank_shifts`` averages it over the image and its translations by up
        to this many pixels (1 + 8 x rank_shifts views; 0 = the image alone), which steadies the score of small
        details at that many times the image-tower cost. ``condition_scale``/``temperature`` default to the prior's
        stored sampling settings. ``precision``: the prior's matrix products in "bf16" or "fp32"; "auto" (the
        default everywhere sampling happens) = bf16 where the device is fast at it. The VQGAN decodes in fp32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if num_candidates < 1 or keep < 1 or batch_size < 1:
            raise ValueError(f"num_candidates, keep and batch_size must be at least 1, got {num_candidates}, {keep} "
                             f"and {batch_size}")
        if keep > num_candidates:
            raise ValueError(f"keep ({keep}) cannot exceed num_candidates ({num_candidates})")
        if rank and self.ranker is None:
            raise ValueError("ranking needs a CLIP part; pass rank=False to keep the first candidates")
        kwargs = dict(condition_scale=condition_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                      batch_size=batch_size, precision=precision)
        results = []
        for prompt in tqdm(prompts, desc="prompts", disable=not progress):
            codes = self.prior.generate([prompt], num_candidates=num_candidates, seed=seed, **kwargs)[0]
            images = self.decode(codes, batch_size)
            scores = None
            if rank:
                scores = torch.cat([self.ranker.score([prompt] * len(c), c, shifts=rank_shifts)
                                    for c in images.split(batch_size)])
            order = scores.argsort(descending=True)[:keep].tolist() if rank else list(range(keep))
            pil = _to_pil(images[order])
            results.append([GeneratedImage(pil[r], _item(scores, i), i, r) for r, i in enumerate(order)])
        return results

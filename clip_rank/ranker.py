"""Scoring and reranking generated candidates with a trained (or any open_clip) CLIP model."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clip_rank.io import build_clip, load_clip, save_clip
from core.errors import ConfigError
from core.files import read_json
from clip_rank.model import ClipModel

Images = Union[torch.Tensor, Sequence[Union[torch.Tensor, Image.Image]]]


def shift_offsets(shifts: int) -> list[tuple[int, int]]:
    """(dx, dy) pixel offsets of the test-time views: (0, 0), then for each r = 1..shifts the 8 translations by
    (-r, 0 or r) x (-r, 0 or r). ``shifts`` 2 gives 17 views."""
    if shifts < 0:
        raise ValueError(f"shifts must be >= 0, got {shifts}")
    return [(0, 0)] + [(r * a, r * b) for r in range(1, shifts + 1) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]


class ClipRanker:
    """Cosine similarity between prompts and images, with the model's own preprocessing.

    Images are PIL images (through open_clip's own eval transform) or tensors in [-1, 1], either one (B, 3, H, W)
    tensor or a list of (3, H, W) tensors (resized/cropped/normalised the same way as the transform does).

    ``shifts`` (test-time views): :meth:`score` averages the cosine over the image and its translations by up to
    ``shifts`` pixels at the model's input size (:func:`shift_offsets`; edges replicated), at 1 + 8 x shifts the
    image-tower cost. Why: a small detail (a corner of a 16-px square) falls differently on the patch grid at each
    offset, and the averaged score is steadier (the shapes demo ranks with 17 views; docs/shapes.md).
    """

    def __init__(self, model: ClipModel, device: Union[str, torch.device] = "cpu", batch_size: int = 64,
                 shifts: int = 0) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        shift_offsets(int(shifts))  # validates
        self.shifts = int(shifts)
        pp = {k: v for k, v in model.preprocess_cfg.items() if k in PreprocessCfg.__dataclass_fields__}
        self.transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)

    @classmethod
    def from_pretrained(cls, path: str, device: Union[str, torch.device] = "cpu", batch_size: int = 64,
                        shifts: int = 0, arch: Optional[str] = None) -> "ClipRanker":
        """Load an open_clip folder (open_clip_config.json + open_clip_model.safetensors: an export of this
        project's or any open_clip ``local-dir``) onto ``device``; or an open_clip checkpoint file (e.g. OpenAI's
        ViT-B/32 weights) for the architecture ``arch``: an open_clip name ("ViT-B-32") or a JSON file with an
        open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, or an ``open_clip_config.json``)."""
        if os.path.isfile(path):
            if not arch:
                raise ConfigError(f"{path} is a checkpoint file: name its open_clip architecture (arch=..., "
                                  "--clip-arch ViT-B-32)")
            if arch.endswith(".json"):
                config = read_json(arch)
                model = build_clip(arch=config.get("model_cfg", config), pretrained=path)
            else:
                model = build_clip(name=arch, pretrained=path)
            return cls(model.eval(), device=device, batch_size=batch_size, shifts=shifts)
        return cls(load_clip(path), device=device, batch_size=batch_size, shifts=shifts)

    def save_pretrained(self, path: str) -> None:
        """Write the model as an open_clip ``local-dir`` folder (atomically), which ``from_pretrained`` and
        ``open_clip.create_model_and_transforms('local-dir:PATH')`` load."""
        save_clip(self.model, path)

    def _pixels(self, images: Images) -> list[torch.Tensor]:
        """-> chunks of model-ready pixels, at most ``batch_size`` images each."""
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            items: list = list(images.split(self.batch_size))
            tensors = True
        else:
            items = list(images)
            tensors = False
        if not items:
            raise ValueError("no images to score")
        chunks = []
        if tensors:
            for chunk in items:
                chunks.append(self._from_tensor(chunk))
            return chunks
        for start in range(0, len(items), self.batch_size):
            part = items[start:start + self.batch_size]
            if all(isinstance(im, Image.Image) for im in part):
                chunks.append(torch.stack([self.transform(im) for im in part]).to(self.device))
            elif all(isinstance(im, torch.Tensor) for im in part):
                chunks.append(self._from_tensor(torch.stack([im.squeeze(0) if im.ndim == 4 else im for im in part])))
            else:
                raise ValueError("images must be all PIL images or all tensors in [-1, 1]")
        return chunks

    def _from_tensor(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():
            raise ValueError(f"image tensors must be float in [-1, 1], got {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.01 or hi > 1.01:
            raise ValueError(f"image tensors must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return self.model.prepare_images(images.to(self.device))

    @torch.inference_mode()
    def image_features(self, images: Images) -> torch.Tensor:
        """Unit-length image embeddings (N, D)."""
        return torch.cat([self.model.encode_preprocessed(px).float() for px in self._pixels(images)])

    def _view_features(self, images: Images, shifts: int) -> torch.Tensor:
        """Unit image embeddings averaged over the test-time views (N, D); with one view, unit length."""
        offsets = shift_offsets(shifts)
        if shifts == 0:
            return self.image_features(images)
        out = []
        for px in self._pixels(images):
            h, w = px.shape[-2:]
            padded = F.pad(px, (shifts,) * 4, mode="replicate")
            views = [self.model.encode_preprocessed(padded[..., shifts + dy:shifts + dy + h,
                                                           shifts + dx:shifts + dx + w]).float()
                     for dx, dy in offsets]
            out.append(torch.stack(views).mean(0))
        return torch.cat(out)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings (N, D)."""
        prompts = list(prompts)
        return torch.cat([self.model.encode_texts(prompts[i:i + self.batch_size]).float()
                          for i in range(0, len(prompts), self.batch_size)])

    @torch.inference_mode()
    def score(self, prompts: Union[str, Sequence[str]], images: Images, shifts: Optional[int] = None) -> torch.Tensor:
        """Cosine similarity of each image with its prompt, averaged over the test-time views: (N,) floats on the CPU.

        ``prompts`` is one prompt for all images, or one per image. ``shifts``: this call's views (None: the
        ranker's own).
        """
        img = self._view_features(images, self.shifts if shifts is None else int(shifts))
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if len(prompts) not in (1, img.shape[0]):
            raise ValueError(f"got {len(prompts)} prompts for {img.shape[0]} images; give one, or one per image")
        slot = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # each distinct prompt is encoded once
        txt = self.text_features(list(slot))
        index = torch.tensor([slot[p] for p in prompts], device=txt.device)
        txt = txt[index].expand(img.shape[0], -1) if len(prompts) == 1 else txt[index]
        return (img * txt).sum(-1).cpu()

    @torch.inference_mode()
    def rank(self, prompt: str, images: Images, k: Optional[int] = None,
             shifts: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best images for ``prompt`` (all when k is None): (indices, scores), best first."""
        if not isinstance(prompt, str):
            raise ValueError("rank takes one prompt (a string); use score() for one prompt per image")
        scores = self.score(prompt, images, shifts)
        order = torch.sort(scores, descending=True, stable=True).indices
        if k is not None:
            if k < 1:
                raise ValueError(f"k must be >= 1, got {k}")
            order = order[:k]
        return order, scores[order]

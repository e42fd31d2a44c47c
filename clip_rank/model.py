"""The CLIP model as a plain nn.Module: an open_clip model plus what it needs to read this project's batches.

Batches carry images in [-1, 1] at the data set's resolution and captions as strings. The wrapper converts both to
what the open_clip model was built for (its own input size and mean/std, its own tokenizer), so the same weights
can be exported to open_clip and used there with open_clip's own transforms unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

Captions = Union[Sequence[str], torch.Tensor]


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ClipModel(nn.Module):
    """An open_clip ``CLIP``/``CustomTextCLIP`` with its tokenizer and preprocessing config.

    ``model_cfg`` is the open_clip architecture dict (``embed_dim``, ``vision_cfg``, ``text_cfg``...) and
    ``preprocess_cfg`` open_clip's preprocessing dict (``size``, ``mean``, ``std``, ``interpolation``,
    ``resize_mode``); both are written unchanged into an export's ``open_clip_config.json``.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., torch.Tensor], model_cfg: dict,
                 preprocess_cfg: dict) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.image_size = _pair(preprocess_cfg.get("size", clip.visual.image_size))
        # Not persistent: they come from the config, so checkpoints hold only open_clip's own keys.
        self.register_buffer("pixel_mean", torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the model's input: resized/cropped like open_clip's transform, normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = (images.float() + 1.0) * 0.5
        h, w = self.image_size
        if tuple(x.shape[-2:]) != (h, w):
            mode = self.preprocess_cfg.get("interpolation", "bicubic")
            interp = TF.InterpolationMode.BILINEAR if mode == "bilinear" else TF.InterpolationMode.BICUBIC
            if self.preprocess_cfg.get("resize_mode", "shortest") == "squash" or h != w:
                x = TF.resize(x, [h, w], interpolation=interp, antialias=True)
            else:  # open_clip's default: shortest side to the target, then a centre crop
                x = TF.center_crop(TF.resize(x, h, interpolation=interp, antialias=True), [h, w])
            x = x.clamp(0.0, 1.0)
        return (x - self.pixel_mean) / self.pixel_std

    def tokenize(self, captions: Captions) -> torch.Tensor:
        """Captions (strings) -> token ids (B, context_length) on the model's device; tensors pass through."""
        if isinstance(captions, torch.Tensor):
            return captions.to(self.pixel_mean.device)
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, got one string")
        return self.tokenizer(list(captions)).to(self.pixel_mean.device)

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images in [-1, 1] -> image embeddings (unit length when ``normalize``)."""
        return self.clip.encode_image(self.prepare_images(images), normalize=normalize)

    def encode_preprocessed(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images already through open_clip's transform (normalised, at the model size) -> embeddings."""
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_texts(self, captions: Captions, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(self.tokenize(captions), normalize=normalize)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def forward(self, images: torch.Tensor, captions: Captions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (unit image features, unit text features, logit scale (the exp of the learned log-temperature))."""
        return self.encode_images(images), self.encode_texts(captions), self.logit_scale()

    def lock(self, image: bool = False, image_unlocked_groups: int = 0, text: bool = False,
             text_unlocked_layers: int = 0) -> None:
        """Freeze towers with open_clip's own lock methods (LiT-style), optionally leaving the last groups free.

        For a ViT image tower the groups are: stem, each block, last block + final norm, projection; for the text
        tower: embeddings, each block, last block + final norm, projection.
        """
        if image:
            self.clip.lock_image_tower(unlocked_groups=image_unlocked_groups)
        if text:
            self.clip.lock_text_tower(unlocked_layers=text_unlocked_layers)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.clip.parameters() if p.requires_grad or not trainable_only)


def symmetric_infonce(image_features: torch.Tensor, text_features: torch.Tensor,
                      logit_scale: torch.Tensor) -> torch.Tensor:
    """Single-process symmetric InfoNCE on one batch (used for validation losses; training uses ClipLoss)."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

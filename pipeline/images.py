"""Images out of the pipeline: [-1, 1] tensors to uint8, grids, PNG files."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid as _torchvision_grid

from core.files import save_png

__all__ = ["make_grid", "save_png", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> uint8 (B, 3, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """uint8 or [-1, 1] float images (B, 3, H, W) -> one uint8 (3, H', W') grid on white, ``nrow`` images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if len(images) == 1:  # torchvision returns a lone image unpadded
        return torch.nn.functional.pad(images[0], (padding,) * 4, value=255)
    return _torchvision_grid(images, nrow=max(1, nrow), padding=padding, pad_value=255)

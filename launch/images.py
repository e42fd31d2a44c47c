"""Image grids: written as PNG files under the run folder (viewable without a server) and to TensorBoard."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch
from PIL import Image

if TYPE_CHECKING:  # importing Lightning costs seconds; the data, tokenizer, bundle and report CLIs never need it
    import pytorch_lightning as pl


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> uint8 (B, 3, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """uint8 or [-1, 1] float images (B, 3, H, W) -> one uint8 (3, H', W') grid, ``nrow`` images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    b, c, h, w = images.shape
    nrow = max(1, min(nrow, b))
    rows = (b + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_png(grid: torch.Tensor, path: str) -> None:
    """Write a uint8 (3, H, W) tensor atomically as PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def log_image_grid(module: pl.LightningModule, tag: str, images: torch.Tensor, nrow: int = 8) -> Optional[str]:
    """Log a grid of [-1, 1] images from inside a LightningModule: PNG in ``<run>/images/`` + TensorBoard.

    Only rank 0 writes. Returns the PNG path (None on other ranks or without a trainer).
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.is_global_zero:
        return None
    grid = make_grid(images, nrow=nrow)
    path = os.path.join(trainer.default_root_dir, "images", f"{tag.replace('/', '_')}_{trainer.global_step:07d}.png")
    save_png(grid, path)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid, global_step=trainer.global_step)
    return path

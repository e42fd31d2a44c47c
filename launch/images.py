"""Image grids logged while training: PNG files under the run folder (viewable without a server) and TensorBoard."""
from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid

from core.files import save_png


def log_image_grid(module: pl.LightningModule, tag: str, images: torch.Tensor, nrow: int = 8) -> Optional[str]:
    """Log a grid of [-1, 1] images from inside a LightningModule: PNG in ``<run>/images/`` + TensorBoard.

    Only rank 0 writes. Returns the PNG path (None on other ranks or without a trainer).
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.is_global_zero:
        return None
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1),
                     pad_value=1.0)
    grid = (grid * 255).round().to(torch.uint8)
    path = os.path.join(trainer.default_root_dir, "images", f"{tag.replace('/', '_')}_{trainer.global_step:07d}.png")
    save_png(grid, path)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid, global_step=trainer.global_step)
    return path

"""Fixtures for the CLIP tests: a tiny architecture and small coloured-square batches with matching captions."""
from __future__ import annotations

import os
from typing import Optional

import torch
from omegaconf import DictConfig

from launch.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "clip_rank", "tiny.yaml")
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
          "yellow": (1.0, 1.0, -1.0), "white": (1.0, 1.0, 1.0), "black": (-1.0, -1.0, -1.0),
          "purple": (0.2, -1.0, 0.6), "cyan": (-1.0, 1.0, 1.0)}


def square_batch(n: int = 8, size: int = 32, seed: int = 0) -> dict:
    """n images of a coloured square on a grey background, captioned with the colour and the side it is on."""
    g = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    images = torch.zeros(n, 3, size, size)
    captions = []
    for i in range(n):
        color = names[i % len(names)]
        left = bool(torch.randint(0, 2, (1,), generator=g))
        x0 = 2 if left else size // 2 + 2
        images[i, :, 4:size - 4, x0:x0 + size // 2 - 4] = torch.tensor(COLORS[color]).view(3, 1, 1)
        captions.append(f"a {color} square on the {'left' if left else 'right'}")
    return {"image": images, "caption": captions, "key": [f"{i:04d}" for i in range(n)]}


class RepeatBatch(torch.utils.data.IterableDataset):
    """The same batch ``n`` times: a Trainer.fit on one fixed batch (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)


def tiny_cfg(tmp_path: Optional[str] = None, overrides: tuple = ()) -> DictConfig:
    base = [f"runs_dir={tmp_path}"] if tmp_path else []
    return load_config(_schema(), TINY_YAML, base + list(overrides))


def _schema():
    from clip_rank.training import ClipRunConfig

    return ClipRunConfig


def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads stall each
    other (a 1 s test took 25 s under load); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

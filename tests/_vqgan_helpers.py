"""Fixtures shared by the VQGAN tests: tiny configs, synthetic image batches and tiny image shards."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from launch.config import load_config
from core.configs import model_preset

TINY_YAML = os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan", "tiny.yaml")


def tiny_run_config(tmp_path, *overrides: str) -> DictConfig:
    from vqgan.training import VQGANRunConfig

    return load_config(VQGANRunConfig, TINY_YAML, [f"runs_dir={tmp_path}/runs", *overrides])


def blocks(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Flat-colour squares on flat backgrounds, in [-1, 1]: quick to learn, like the shapes set."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    fg = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    x = bg.expand(n, 3, size, size).clone()
    for i in range(n):
        a, b = torch.randint(0, size // 2, (2,), generator=g).tolist()
        s = size // 2
        x[i, :, a:a + s, b:b + s] = fg[i, :, :, :]
    return x


def write_image_shards(out_dir: str, n_shards: int = 2, per_shard: int = 5, size: int = 32) -> list[tuple[str, str]]:
    """Tiny PNG+caption tars; returns [(key, caption)] in write order."""
    import webdataset as wds
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    images = blocks(n_shards * per_shard, size)
    written = []
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(out_dir, f"{s:06d}.tar")) as tw:
            for j in range(per_shard):
                i = s * per_shard + j
                arr = ((images[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                key, caption = f"s{s}_{j:03d}", f"caption number {i}"
                tw.write({"__key__": key, "png": buf.getvalue(), "txt": caption})
                written.append((key, caption))
    return written


def tiny_config_dict(**overrides) -> dict:
    return {**model_preset("vqgan", "tiny"), **overrides}


def as_dictconfig(d: dict) -> DictConfig:
    return OmegaConf.create(d)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds synchronisation stalls
    (measured 10-100x slower per step under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

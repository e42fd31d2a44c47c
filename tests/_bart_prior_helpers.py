"""Fixtures for the bart_prior tests: a caption tokenizer, tiny code shard sets and a tiny prior."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import webdataset as wds

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def caption(i: int) -> str:
    return f"a {COLORS[i % 4]} {SHAPES[(i // 4) % 3]}"


def write_code_shards(folder: str, n: int, grid=(8, 8), codebook_size: int = 64, seed: int = 0,
                      per_shard: int = 64) -> str:
    """Codes that depend on the caption (plus 20% noise), so a prior can learn them; returns a glob pattern."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        with wds.TarWriter(os.path.join(folder, f"{s // per_shard:06d}.tar")) as w:
            for i in range(s, min(n, s + per_shard)):
                base = (i % 4) * 8 + (i // 4) % 3
                codes = (base + np.arange(grid[0] * grid[1]).reshape(grid)) % codebook_size
                noise = rng.random(grid) < 0.2
                codes[noise] = rng.integers(0, codebook_size, int(noise.sum()))
                buf = io.BytesIO()
                np.save(buf, codes.astype(np.uint16))
                w.write({"__key__": f"{i:06d}", "codes.npy": buf.getvalue(), "txt": caption(i)})
    return os.path.join(folder, "*.tar")


def make_tokenizer(folder: str):
    from bart_prior.tokenizer import train_tokenizer

    captions = [caption(i) for i in range(48)] + ["a purple hexagon on the right", "ünïcödé 日本"]
    return train_tokenizer(captions, vocab_size=300, out_dir=folder, min_frequency=1)


def tiny_prior(tokenizer, codebook_size: int = 64, grid=(4, 4), seed: int = 0, arch: str = "bart"):
    """A tiny prior; the dallebart one has an image vocabulary larger than its codebook, as DALL·E Mega's."""
    import torch

    from bart_prior import BartPrior, preset

    torch.manual_seed(seed)
    extra = dict(arch="dallebart", image_vocab_size=codebook_size + 7) if arch == "dallebart" else {}
    return BartPrior(preset("tiny", codebook_size=codebook_size, grid=list(grid), max_text_length=20, **extra),
                     tokenizer).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP workers
    made these tests several times slower; import this fixture into a test module to use it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

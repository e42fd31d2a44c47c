"""Fixtures for the data tests: tiny shard sets whose pixels encode the sample index."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from data import ShardWriter


def colour(i: int) -> tuple[int, int, int]:
    return (i * 7 % 256, i * 13 % 256, i * 29 % 256)


def png(rgb: tuple[int, int, int], size: int = 8, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_set(out_dir: str, n_shards: int, per_shard: int, size: int = 8, codes: bool = False) -> list[str]:
    """``n_shards`` shards of ``per_shard`` samples keyed s{index}; returns the keys in write order."""
    keys = []
    with ShardWriter(out_dir, shard_size=per_shard) as writer:
        for i in range(n_shards * per_shard):
            key = f"s{i:05d}"
            sample = {"__key__": key, "txt": f"caption {i}"}
            if codes:
                buf = io.BytesIO()
                np.save(buf, np.full((2, 3), i, dtype=np.uint16))
                sample["codes.npy"] = buf.getvalue()
            else:
                sample["png"] = png(colour(i), size)
            writer.write(sample)
            keys.append(key)
    return keys


def pattern(out_dir: str, n_shards: int) -> str:
    return os.path.join(out_dir, "{%06d..%06d}.tar" % (0, n_shards - 1))

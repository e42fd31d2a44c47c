"""Start-up checks that a code shard set was written by a VQGAN matching the prior (codebook size, grid)."""
from __future__ import annotations

import itertools
import os
from typing import Sequence

import torch

from core.errors import ConfigError
from core.files import read_json


class CodeShardMismatch(ConfigError):
    """The code shards do not fit the model config: another VQGAN's codebook size or token grid."""


def _manifest(urls: list[str]) -> tuple[str, dict] | None:
    """A manifest.json next to the shards or one folder up (encoders may write one per split or per set)."""
    folder = os.path.dirname(os.path.abspath(urls[0]))
    for path in (os.path.join(folder, "manifest.json"), os.path.join(os.path.dirname(folder), "manifest.json")):
        if os.path.isfile(path):
            return path, read_json(path)
    return None


def check_batch(codes: torch.Tensor, codebook_size: int, grid: Sequence[int], where: str = "batch") -> None:
    """Raise CodeShardMismatch unless ``codes`` is (B, h, w) with ids in [0, codebook_size)."""
    h, w = int(grid[0]), int(grid[1])
    if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
        raise CodeShardMismatch(f"{where}: code grid {tuple(codes.shape[1:])} does not match model.grid {[h, w]}; "
                                "encode the shards with the VQGAN the prior is for, or fix model.grid")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise CodeShardMismatch(f"{where}: code ids reach {hi} (min {lo}) but model.codebook_size is {codebook_size};"
                                " encode the shards with the VQGAN the prior is for, or fix model.codebook_size")


def check_code_shards(pattern: str, codebook_size: int, grid: Sequence[int], max_samples: int = 64) -> None:
    """Check the manifest (when there is one) and the first ``max_samples`` samples of ``pattern``."""
    from data import expand_pattern, iter_samples

    urls = expand_pattern(pattern)
    found = _manifest(urls)
    if found:
        path, man = found
        size, man_grid = man.get("codebook_size"), man.get("grid") or man.get("token_grid")
        if size is not None and int(size) != codebook_size:
            raise CodeShardMismatch(f"{path}: the shards hold codes of a {size}-entry codebook but "
                                    f"model.codebook_size is {codebook_size}")
        if man_grid is not None and [int(g) for g in man_grid] != [int(g) for g in grid]:
            raise CodeShardMismatch(f"{path}: the shards hold a {list(man_grid)} code grid but model.grid is "
                                    f"{list(grid)}")
    samples = list(itertools.islice(iter_samples(pattern, mode="codes"), max_samples))
    if not samples:
        raise CodeShardMismatch(f"no readable code samples in '{pattern}'")
    shapes = {tuple(s["codes"].shape) for s in samples}
    if len(shapes) > 1:
        raise CodeShardMismatch(f"'{pattern}': code grids differ between samples: {sorted(shapes)}")
    check_batch(torch.stack([s["codes"] for s in samples]), codebook_size, grid, where=f"'{pattern}'")

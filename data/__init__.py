"""Shared WebDataset data module, shard writing tools and the synthetic shapes benchmark.

The Lightning data module is imported on first use, so the shard tools (``python -m data``) and encoders that only
need :func:`iter_samples` do not pay for importing pytorch_lightning.
"""
from typing import Any

from data.config import DataConfig
from data.decode import SKIP_KINDS, SkipTally, decode_caption, load_image, resize_crop, to_rgb
from data.errors import DataError
from data.shards import ShardWriter, complete_shards, count_samples, expand_pattern, iter_captions, iter_samples

__all__ = ["DataConfig", "DataError", "SKIP_KINDS", "ShardDataModule", "ShardWriter", "SkipTally",
           "SkippedSamplesLogger", "complete_shards", "count_samples", "decode_caption", "expand_pattern",
           "iter_captions", "iter_samples", "load_image", "resize_crop", "to_rgb"]


def __getattr__(name: str) -> Any:
    if name in ("ShardDataModule", "SkippedSamplesLogger"):
        from data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'data' has no attribute '{name}'")

"""Shared WebDataset data module, shard writing tools and the synthetic shapes benchmark."""
from data.config import DataConfig
from data.datamodule import ShardDataModule, SkippedSamplesLogger
from data.decode import SKIP_KINDS, SkipTally, load_image, resize_crop, to_rgb
from data.errors import DataError
from data.shards import ShardWriter, complete_shards, count_samples, expand_pattern, iter_samples

__all__ = ["DataConfig", "DataError", "SKIP_KINDS", "ShardDataModule", "ShardWriter", "SkipTally",
           "SkippedSamplesLogger", "complete_shards", "count_samples", "expand_pattern", "iter_samples", "load_image",
           "resize_crop", "to_rgb"]

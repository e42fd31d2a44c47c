"""Shared WebDataset data module, shard writing tools and the synthetic shapes benchmark."""
from data.config import DataConfig

__all__ = ["DataConfig"]

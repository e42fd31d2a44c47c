"""CLIP for reranking: open_clip models trained/fine-tuned on the shared shards, exported in open_clip's format."""
from clip_rank.io import CONFIG_NAME, WEIGHTS_NAME, PretrainedNotFoundError, build_clip, load_clip, save_clip
from clip_rank.model import ClipModel
from clip_rank.ranker import ClipRanker

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ClipModel", "ClipRanker", "PretrainedNotFoundError", "build_clip",
           "load_clip", "save_clip"]

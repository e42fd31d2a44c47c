"""BART prior: caption tokens -> VQGAN code sequences (DALL·E Mini's text-to-image stage).

Every name is imported on first use: the tokenizer CLI (``python -m bart_prior.tokenizer``) then neither pays for
transformers' BART modelling code nor finds its own module imported twice (runpy's RuntimeWarning).
"""
from typing import Any

_LAZY = {"TokenizerError": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
         "PriorConfig": "model", "PriorConfigError": "model", "PriorModel": "model", "CodePredictor": "model",
         "build_model": "model", "DalleBartModel": "dallebart",
         "preset": "model", "BartPrior": "prior", "SamplingOptions": "sampling", "candidate_seed": "sampling",
         "sample_codes": "sampling"}

__all__ = ["BartPrior", "CodePredictor", "DalleBartModel", "PriorConfig", "PriorConfigError", "PriorModel",
           "build_model",
           "SamplingOptions", "TokenizerError", "candidate_seed", "load_tokenizer", "preset", "sample_codes",
           "train_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bart_prior.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'bart_prior' has no attribute '{name}'")

"""BART prior: caption tokens -> VQGAN code sequences (DALL·E Mini's text-to-image stage).

The network, the prior object and sampling are imported on first use, so the tokenizer CLI
(``python -m bart_prior.tokenizer``) does not pay for importing transformers' BART modelling code.
"""
from typing import Any

from bart_prior.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

_LAZY = {"PRESETS": "model", "PriorConfig": "model", "PriorConfigError": "model", "PriorModel": "model",
         "preset": "model", "BartPrior": "prior", "SamplingOptions": "sampling", "candidate_seed": "sampling",
         "sample_codes": "sampling"}

__all__ = ["BartPrior", "PRESETS", "PriorConfig", "PriorConfigError", "PriorModel",
           "SamplingOptions", "TokenizerError", "candidate_seed", "load_tokenizer", "preset", "sample_codes",
           "train_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bart_prior.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'bart_prior' has no attribute '{name}'")

"""BART prior: caption tokens -> VQGAN code sequences (DALL·E Mini's text-to-image stage)."""
from bart_prior.model import PRESETS, PriorConfig, PriorConfigError, PriorModel, preset
from bart_prior.prior import BartPrior
from bart_prior.sampling import SamplingOptions, candidate_seed, sample_codes
from bart_prior.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

__all__ = ["BartPrior", "PRESETS", "PriorConfig", "PriorConfigError", "PriorModel",
           "SamplingOptions", "TokenizerError", "candidate_seed", "load_tokenizer", "preset", "sample_codes",
           "train_tokenizer"]

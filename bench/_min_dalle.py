"""min-dalle 0.4.11 as a reference to measure and check against (a test and benchmark dependency, installed with
``pip install --no-deps min-dalle==0.4.11``; never imported by the project's packages).

Its package ``__init__`` imports ``min_dalle.min_dalle``, which turns autograd off for the whole process, sets
torch's thread count and needs ``requests``: its modules are imported here under a stand-in package instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch

IMAGE_TOKENS = 256  # min-dalle decodes exactly this many codes


def import_min_dalle(module: str) -> types.ModuleType:
    """``min_dalle.<module>`` without running the package's ``__init__``."""
    if "_min_dalle_ref" not in sys.modules:
        spec = importlib.util.find_spec("min_dalle")
        if spec is None:
            raise ImportError("min-dalle is not installed: pip install --no-deps min-dalle==0.4.11")
        package = types.ModuleType("_min_dalle_ref")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["_min_dalle_ref"] = package
    return importlib.import_module(f"_min_dalle_ref.{module}")


def load_min_dalle(folder: str, suffix: str, layers: int, d: int, heads: int, glu: int, text_vocab: int,
                   image_vocab: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """min-dalle's encoder and decoder, built with its classes and loaded strictly from its files in ``folder``."""
    enc = import_min_dalle("models.dalle_bart_encoder").DalleBartEncoder(
        layer_count=layers, embed_count=d, attention_head_count=heads, text_vocab_count=text_vocab,
        text_token_count=64, glu_embed_count=glu, device="cpu")
    dec = import_min_dalle("models.dalle_bart_decoder").DalleBartDecoder(
        image_vocab_count=image_vocab, embed_count=d, attention_head_count=heads, glu_embed_count=glu,
        layer_count=layers, device="cpu")
    for module, name in ((enc, "encoder"), (dec, "decoder")):
        state = torch.load(os.path.join(folder, f"{name}{suffix}.pt"), map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    return enc.eval(), dec.eval()


@torch.no_grad()
def min_dalle_sample(enc: torch.nn.Module, dec: torch.nn.Module, tokens: list[int], images: int, scale: float,
                     top_k: int, temperature: float, start: int) -> torch.Tensor:
    """``MinDalle.generate_raw_image_stream``'s sampling loop on one caption's token ids -> (images, 256) codes.
    torch's global generator drives it, as in min-dalle."""
    text = torch.ones(2, 64, dtype=torch.long)
    text[0, :2] = torch.tensor([tokens[0], tokens[-1]])  # the unconditional row: <s></s>
    text[1, : len(tokens)] = torch.tensor(tokens[:64])
    rows = [0] * images + [1] * images
    state = enc(text)[rows]
    mask = text[rows].ne(1)[:, None, None, :]
    layers, d = len(dec.layers), dec.embed_count
    cache = torch.zeros(layers, 4 * images, IMAGE_TOKENS, d)
    codes = torch.full((images, IMAGE_TOKENS + 1), start, dtype=torch.long)
    settings = torch.tensor([temperature, top_k, scale], dtype=torch.float32)
    positions = torch.arange(IMAGE_TOKENS)
    for i in range(IMAGE_TOKENS):
        codes[:, i + 1], cache = dec.sample_tokens(settings, attention_mask=mask, encoder_state=state,
                                                   attention_state=cache, prev_tokens=codes[:, [i]],
                                                   token_index=positions[[i]])
    return codes[:, 1:]

"""The text-to-image-codes network: a BART encoder over caption tokens and a BART decoder over VQGAN codes.

Built from transformers' ``BartEncoder``/``BartDecoder`` with separate configs, because the two sides have different
vocabularies: the decoder's is the codebook plus one start token (id = codebook size), with its own embedding table
and a bias-free output head that is not tied to anything (DALL·E Mini's layout).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartConfig
from transformers.models.bart.modeling_bart import BartDecoder, BartEncoder

from core.configs import check_field_types, model_preset
from core.errors import ConfigError
from core.files import load_safetensors, read_json


class PriorConfigError(ConfigError):
    """An impossible model configuration or an unusable pretrained encoder folder."""


@dataclass
class PriorConfig:
    """Architecture of the prior (the ``model:`` config section, also saved as ``config.json``)."""

    # bart: transformers' BART layers (biases, post-norm, GELU feed-forward) | dallebart: the published DALL·E
    # Mini / Mega architecture (bart_prior/dallebart.py: no biases, NormFormer norms, GLU feed-forward)
    arch: str = "bart"
    codebook_size: int = 1024  # VQGAN codes: the only ids ever sampled
    # decoder embedding and head rows = image_vocab_size + 1; may exceed the codebook (DALL·E Mega: 16415), the ids
    # past it are never sampled. None = codebook_size
    image_vocab_size: Optional[int] = None
    start_token: Optional[int] = None  # the decoder's first input id; None = image_vocab_size (dalle-mini's)
    grid: list[int] = field(default_factory=lambda: [16, 16])  # (h, w) code grid of the VQGAN; length = h*w
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    attention_heads: int = 4
    ffn_dim: int = 1024  # the feed-forward's hidden width (GLU width for dallebart)
    activation: str = "gelu"  # bart only; dallebart's GLU uses the exact GELU
    dropout: float = 0.0
    attention_dropout: float = 0.0
    text_vocab_size: Optional[int] = None  # filled from the tokenizer when None
    text_pad_token_id: int = 1
    max_text_length: int = 64  # captions are truncated to this many tokens (with <s> and </s>)
    text_positions: Optional[int] = None  # encoder position table; defaults to max_text_length
    # A BART checkpoint folder (config.json + model.safetensors) whose encoder and token embeddings start the
    # text side; the architecture of the encoder is then taken from that checkpoint.
    text_encoder_from: Optional[str] = None
    # dalle-mini's caption normalisation (bart_prior/text.py) before tokenizing; on for converted dalle-mini
    # checkpoints, whose tokenizer was trained on normalised text
    normalize_text: bool = False
    # a word-frequency file (one word per line, most frequent first: dalle-mini's enwiki-words-frequency.txt) for
    # the normaliser's hashtag splitting; None leaves hashtags as one word
    word_frequencies: Optional[str] = None
    init_std: float = 0.02
    # generate()'s default guidance scale. 1 = plain conditional sampling: strong super-conditioning makes a small
    # model's images worse, so the right scale depends on the model and is measured, not copied from dalle-mini
    # (`train.py bundle --condition-scale` stores a measured one; the demo stores the best of its sweep).
    condition_scale: float = 1.0
    temperature: float = 1.0  # generate()'s default sampling temperature, stored the same way
    # Only used by sample logging during training: a VQGAN save_pretrained folder to decode codes to images.
    vqgan_for_samples: Optional[str] = None

    @property
    def seq_len(self) -> int:
        return int(self.grid[0]) * int(self.grid[1])

    @property
    def decoder_vocab_size(self) -> int:
        """Rows of the decoder embedding and the head: the image vocabulary plus the start token."""
        return (self.image_vocab_size or self.codebook_size) + 1

    @property
    def start_token_id(self) -> int:
        return (self.image_vocab_size or self.codebook_size) if self.start_token is None else self.start_token

    def check(self) -> None:
        """PriorConfigError naming the first impossible setting."""
        if self.arch not in ("bart", "dallebart"):
            raise PriorConfigError(f"model.arch must be bart or dallebart, got '{self.arch}'")
        if self.codebook_size < 1 or min(self.d_model, self.attention_heads, self.ffn_dim) < 1:
            raise PriorConfigError("model.codebook_size, d_model, attention_heads and ffn_dim must be positive")
        if self.image_vocab_size is not None and self.image_vocab_size < self.codebook_size:
            raise PriorConfigError(f"model.image_vocab_size ({self.image_vocab_size}) is smaller than "
                                   f"model.codebook_size ({self.codebook_size})")
        if not 0 <= self.start_token_id < self.decoder_vocab_size:
            raise PriorConfigError(f"model.start_token {self.start_token_id} is outside the decoder vocabulary "
                                   f"[0, {self.decoder_vocab_size})")
        if self.d_model % self.attention_heads:
            raise PriorConfigError(f"d_model {self.d_model} is not divisible by attention_heads {self.attention_heads}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise PriorConfigError(f"model.grid must be [h, w], got {self.grid}")
        if self.arch == "dallebart" and self.text_encoder_from:
            raise PriorConfigError("model.text_encoder_from loads a BART encoder; it does not fit model.arch dallebart")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> "PriorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PriorConfigError(f"{source}: unknown model config keys: {', '.join(unknown)}")
        check_field_types(cls, values, source, PriorConfigError)
        cfg = cls(**values)
        cfg.grid = [int(g) for g in cfg.grid]
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset(name: str, **overrides: Any) -> PriorConfig:
    """The model size of a shipped config (the ``model:`` section of configs/bart_prior/NAME.yaml: tiny, shapes,
    mini, mega, ...) with ``overrides`` (e.g. the VQGAN's codebook_size and grid)."""
    values = {k: v for k, v in model_preset("bart_prior", name).items() if v is not None}
    return PriorConfig.from_dict({**values, **overrides}, source=f"configs/bart_prior/{name}.yaml")


def _read_pretrained_bart(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    if not os.path.isdir(folder) or not os.path.isfile(cfg_path) or not os.path.isfile(weights):
        raise PriorConfigError(f"model.text_encoder_from: no BART checkpoint at {folder} (need config.json and "
                               "model.safetensors, e.g. from BartModel.save_pretrained); set it to null to train "
                               "the text encoder from scratch")
    return read_json(cfg_path), load_safetensors(weights)


def resolve_text_encoder(cfg: PriorConfig) -> PriorConfig:
    """Take the encoder's architecture from ``cfg.text_encoder_from`` when set (before building the model)."""
    if not cfg.text_encoder_from:
        return cfg
    hf, _ = _read_pretrained_bart(cfg.text_encoder_from)
    if int(hf["d_model"]) != cfg.d_model:
        raise PriorConfigError(f"model.d_model is {cfg.d_model} but the pretrained encoder at {cfg.text_encoder_from} "
                               f"has d_model {hf['d_model']}; the decoder's cross-attention needs them equal")
    return dataclasses.replace(
        cfg, encoder_layers=int(hf["encoder_layers"]), text_vocab_size=int(hf["vocab_size"]),
        text_positions=int(hf["max_position_embeddings"]), text_pad_token_id=int(hf.get("pad_token_id") or 1),
        attention_heads=int(hf["encoder_attention_heads"]), ffn_dim=int(hf["encoder_ffn_dim"]),
        activation=str(hf.get("activation_function", "gelu")))


class CodePredictor(nn.Module):
    """What both architectures share: the head over real codes and teacher forcing's shifted inputs. Subclasses
    provide ``encoder``, ``decoder`` (with ``layers``), ``lm_head``, ``encode`` and ``decode``."""

    lm_head: nn.Linear

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        cfg.check()
        if cfg.text_vocab_size is None:
            raise PriorConfigError("model.text_vocab_size is unset (it is filled from the tokenizer)")
        self.cfg = cfg

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) decoder ids from position 0 -> (B, L, d) hidden states."""
        raise NotImplementedError

    def embed_step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """(N,) decoder inputs at position ``pos`` -> (N, 1, d): what the first decoder layer reads (cached decoding)."""
        raise NotImplementedError

    def final_step(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's output -> what the head reads."""
        return x

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over real codes only: the head's rows past the codebook (the start token, and unused ids where the
        image vocabulary is larger) are never predictions."""
        return F.linear(hidden, self.lm_head.weight[: self.cfg.codebook_size])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, encoder_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) caption ids/mask + (B, L) decoder ids -> (B, L, codebook_size) logits."""
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        return self.code_logits(self.decode(decoder_input_ids, encoder_hidden, attention_mask))

    def decoder_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, L) codes -> start token + codes[:-1] (teacher forcing)."""
        flat = codes.reshape(codes.shape[0], -1)
        start = flat.new_full((flat.shape[0], 1), self.cfg.start_token_id)
        return torch.cat([start, flat[:, :-1]], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: PriorConfig) -> CodePredictor:
    """The network of ``cfg.arch``."""
    if cfg.arch == "dallebart":
        from bart_prior.dallebart import DalleBartModel

        return DalleBartModel(cfg)
    return PriorModel(cfg)


class PriorModel(CodePredictor):
    """``arch: bart``: caption tokens -> logits over the codebook for every image position (teacher forcing)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        common = dict(d_model=cfg.d_model, encoder_attention_heads=cfg.attention_heads,
                      decoder_attention_heads=cfg.attention_heads, encoder_ffn_dim=cfg.ffn_dim,
                      decoder_ffn_dim=cfg.ffn_dim, activation_function=cfg.activation, dropout=cfg.dropout,
                      attention_dropout=cfg.attention_dropout, init_std=cfg.init_std, scale_embedding=False,
                      bos_token_id=None, eos_token_id=None, forced_eos_token_id=None, attn_implementation="sdpa")
        enc_cfg = BartConfig(vocab_size=cfg.text_vocab_size, encoder_layers=cfg.encoder_layers, decoder_layers=0,
                             max_position_embeddings=cfg.text_positions or cfg.max_text_length,
                             pad_token_id=cfg.text_pad_token_id, **common)
        # No padding row on the image side: every id is a real code, and a padding_idx would freeze one of them.
        dec_cfg = BartConfig(vocab_size=cfg.decoder_vocab_size, encoder_layers=0, decoder_layers=cfg.decoder_layers,
                             max_position_embeddings=cfg.seq_len, pad_token_id=None,
                             decoder_start_token_id=cfg.start_token_id, **common)
        self.encoder = BartEncoder(enc_cfg)
        self.decoder = BartDecoder(dec_cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.decoder_vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        if cfg.text_encoder_from:
            self.load_text_encoder(cfg.text_encoder_from)

    def load_text_encoder(self, folder: str) -> None:
        """Copy encoder layers and token/position embeddings from a BART checkpoint (BartModel or
        BartForConditionalGeneration layout)."""
        _, state = _read_pretrained_bart(folder)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        if "embed_tokens.weight" not in enc and "shared.weight" in state:  # tied to the shared table in BART
            enc["embed_tokens.weight"] = state["shared.weight"]
        missing, unexpected = self.encoder.load_state_dict(enc, strict=False)
        if missing or unexpected:
            raise PriorConfigError(f"pretrained encoder at {folder} does not fit: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                            encoder_attention_mask=encoder_mask, use_cache=False).last_hidden_state

    def embed_step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        dec = self.decoder
        return dec.layernorm_embedding(dec.embed_tokens(tokens[:, None])
                                       + dec.embed_positions.weight[pos + dec.embed_positions.offset])

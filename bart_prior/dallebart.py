"""DalleBart: the prior of the published DALL·E Mini / Mega checkpoints (``model.arch: dallebart``).

BART's encoder-decoder with dalle-mini's changes: no biases in any projection, NormFormer norm placement (a norm
before and after each attention block), GLU feed-forwards with a norm at their input and one over their hidden
width, learned absolute positions from 0, LayerNorm epsilon 1e-5, an embedding norm and a final norm on both sides,
and an untied decoder embedding and head of ``image_vocab_size + 1`` rows (the extra row is the start token). The
norms that precede a projection carry a bias but no scale, as in the published weights.

Module and parameter names follow min-dalle's PyTorch port (``layers.{i}.pre_self_attn_layer_norm``, ``glu.fc0``,
...), so its files load with a prefix and dalle-mini's Flax tree maps one-to-one (bart_prior/convert.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bart_prior.model import CodePredictor, PriorConfig

EPS = 1e-5


class BiasOnlyLayerNorm(nn.Module):
    """LayerNorm with a learned bias and a scale fixed at 1 (dalle-mini's ``use_scale=False`` norms)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an explicit scale of ones: torch's CPU layer_norm backward fails on a bf16 input with no weight under
        # autocast ("expected scalar type BFloat16 but found Float")
        return F.layer_norm(x, self.bias.shape, torch.ones_like(self.bias), self.bias, EPS)


class GLU(nn.Module):
    """x -> fc2(LN(gelu(fc0(LN(x))) * fc1(LN(x)))) (exact, erf-based GELU)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.ln0 = BiasOnlyLayerNorm(d_model)
        self.fc0 = nn.Linear(d_model, hidden, bias=False)
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.ln1 = BiasOnlyLayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ln0(x)
        return self.fc2(self.ln1(F.gelu(self.fc0(z)) * self.fc1(z)))


class Attention(nn.Module):
    """Multi-head attention without biases; heads split by a plain reshape."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model, bias=False)
                                                                for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                causal: bool = False) -> torch.Tensor:
        """``key_mask``: (B, S) True where a key takes part; ``causal``: each query sees keys up to its own."""
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(self._split(self.q_proj(x)), self._split(self.k_proj(context)),
                                             self._split(self.v_proj(context)), attn_mask=mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, hidden: int):
        super().__init__()
        self.pre_self_attn_layer_norm = BiasOnlyLayerNorm(d_model)
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=EPS)
        self.glu = GLU(d_model, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.pre_self_attn_layer_norm(x)
        x = x + self.self_attn_layer_norm(self.self_attn(h, h, mask))
        return x + self.glu(x)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, hidden: int):
        super().__init__()
        self.pre_self_attn_layer_norm = BiasOnlyLayerNorm(d_model)
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=EPS)
        self.pre_encoder_attn_layer_norm = BiasOnlyLayerNorm(d_model)
        self.encoder_attn = Attention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model, eps=EPS)
        self.glu = GLU(d_model, hidden)

    def forward(self, x: torch.Tensor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        h = self.pre_self_attn_layer_norm(x)
        x = x + self.self_attn_layer_norm(self.self_attn(h, h, causal=True))
        h = self.pre_encoder_attn_layer_norm(x)
        x = x + self.encoder_attn_layer_norm(self.encoder_attn(h, encoder_hidden, encoder_mask))
        return x + self.glu(x)


class _Stack(nn.Module):
    """Token + position embeddings, an embedding norm, layers and a final norm: one side of the model."""

    def __init__(self, vocab: int, positions: int, d_model: int, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.embed_positions = nn.Embedding(positions, d_model)
        self.layernorm_embedding = nn.LayerNorm(d_model, eps=EPS)
        self.layers = nn.ModuleList(layers)
        self.final_ln = BiasOnlyLayerNorm(d_model)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, L) ids at positions start..start+L-1 -> normalised embeddings."""
        if start + ids.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(f"{start + ids.shape[1]} positions, the model has {self.embed_positions.num_embeddings}")
        positions = self.embed_positions.weight[start: start + ids.shape[1]]
        return self.layernorm_embedding(self.embed_tokens(ids) + positions)


class DalleBartModel(CodePredictor):
    """``arch: dallebart``: caption tokens -> logits over the codebook for every image position (teacher forcing),
    with the interface of :class:`bart_prior.model.PriorModel`."""

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        d, heads, hidden = cfg.d_model, cfg.attention_heads, cfg.ffn_dim
        self.encoder = _Stack(cfg.text_vocab_size, cfg.text_positions or cfg.max_text_length, d,
                              [EncoderLayer(d, heads, hidden) for _ in range(cfg.encoder_layers)])
        self.decoder = _Stack(cfg.decoder_vocab_size, cfg.seq_len, d,
                              [DecoderLayer(d, heads, hidden) for _ in range(cfg.decoder_layers)])
        self.lm_head = nn.Linear(d, cfg.decoder_vocab_size, bias=False)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder.embed(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, attention_mask)
        return self.encoder.final_ln(x)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) decoder ids from position 0 -> (B, L, d) hidden states after the final norm."""
        x = self.decoder.embed(decoder_input_ids)
        for layer in self.decoder.layers:
            x = layer(x, encoder_hidden, encoder_mask)
        return self.decoder.final_ln(x)

    def embed_step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self.decoder.embed(tokens[:, None], start=pos)

    def final_step(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_ln(x)

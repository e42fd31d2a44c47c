"""Guided sampling of image codes with a preallocated KV cache.

One decoder batch holds every candidate twice: conditional rows first, then unconditional (empty caption) rows, so
super-conditioning costs one pass per step instead of two. Cross-attention keys/values are constant during decoding,
so they are projected once per distinct caption (the empty caption once for everything) and shared, not copied, by
the rows of that caption.
Each candidate draws its uniforms from its own generator, seeded from (seed, prompt index, candidate index), and
picks a code by inverse CDF: the result does not depend on how candidates are batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bart_prior.model import CodePredictor
from core.hardware import bf16_is_fast


@dataclass
class SamplingOptions:
    condition_scale: float = 1.0  # logits = uncond + scale * (cond - uncond); 1 = plain conditional sampling
    temperature: float = 1.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # "bf16": the cached decoder's matrix products with bf16 weights and inputs, everything else (attention, its
    # cache, norms, sampling) in fp32; about 2x faster projections on GPUs and AVX512-bf16 CPUs
    precision: str = "fp32"


# bf16 matrix products pay on a CPU only once a decoder batch carries enough work, measured as rows x d_model
# (python -m bench.prior_sampling): on an AVX512-bf16 CPU at d_model 128, bf16 is slower than fp32 up to 64 rows and
# about 5% faster from 256; at d_model 192 it is slower at 2 rows and faster at 32.
CPU_BF16_MIN_WORK = 16384


def resolve_precision(precision: str, device: torch.device, rows: int = 32, d_model: int = 1024) -> str:
    """'auto' -> 'bf16' where it is faster: where bf16 matrix products are fast (core.hardware), and on CPUs only
    once a decoder batch has ``rows x d_model >= CPU_BF16_MIN_WORK`` (below that the conversions cost more than the
    bf16 products save: 128 rows for the shapes prior, 16 for a 1024-wide one)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got '{precision}'")
    if precision != "auto":
        return precision
    fast = bf16_is_fast(device) and (device.type != "cpu" or rows * d_model >= CPU_BF16_MIN_WORK)
    return "bf16" if fast else "fp32"


def candidate_seed(seed: int, prompt_index: int, candidate_index: int) -> int:
    """A well-mixed 63-bit seed per candidate, independent of batching."""
    return int(np.random.SeedSequence([seed, prompt_index, candidate_index]).generate_state(2, np.uint64)[0] >> 1)


def candidate_uniforms(seeds: Sequence[int], length: int) -> torch.Tensor:
    """(N, length) uniforms in [0, 1): one per decoding step for each candidate."""
    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds])


def pick_codes(logits: torch.Tensor, uniforms: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """(N, K) guided logits + (N,) uniforms -> (N,) code ids, after temperature, top-k and top-p."""
    logits = logits.float()
    if opts.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / opts.temperature
    k = logits.shape[-1] if not opts.top_k else min(int(opts.top_k), logits.shape[-1])
    values, ids = logits.topk(k, dim=-1)  # sorted, largest first
    probs = torch.softmax(values.double(), dim=-1)
    if opts.top_p is not None and opts.top_p < 1.0:
        before = probs.cumsum(-1) - probs
        probs = probs * (before < opts.top_p)  # the first (largest) token always stays
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=k - 1)
    return ids.gather(1, choice).squeeze(1)


def guide(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Super-conditioning: uncond + scale x (cond - uncond). Applied to the final hidden states rather than to the
    logits: the head is linear with no bias, so the logits are the same, at half the cost of the largest matrix
    product of a step (the head over the whole codebook)."""
    return cond if uncond is None else uncond + scale * (cond - uncond)


Cast = Callable[..., tuple]
Linear = Callable[..., torch.Tensor]


class _BartBlocks:
    """How a BART (post-norm) decoder layer wraps its attention and feed-forward, for the cached decoder."""

    def __init__(self, layer: nn.Module, cast: Cast):
        self.layer = layer
        self.fc = [cast(layer.fc1.weight, layer.fc1.bias), cast(layer.fc2.weight, layer.fc2.bias)]

    def self_in(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def self_out(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn_layer_norm(x + a)

    cross_in = self_in

    def cross_out(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.layer.encoder_attn_layer_norm(x + a)

    def feed_forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        h = linear(self.layer.activation_fn(linear(x, *self.fc[0])), *self.fc[1])
        return self.layer.final_layer_norm(x + h)


class _DalleBartBlocks:
    """How a DalleBart (NormFormer) decoder layer wraps its attention and GLU, for the cached decoder."""

    def __init__(self, layer: nn.Module, cast: Cast):
        self.layer, glu = layer, layer.glu
        # the GLU's two input projections as one matrix product: fewer, larger products run faster on a CPU
        self.fc = [cast(torch.cat([glu.fc0.weight, glu.fc1.weight])), cast(glu.fc2.weight)]
        self.width = glu.fc0.weight.shape[0]

    def self_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.pre_self_attn_layer_norm(x)

    def self_out(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x + self.layer.self_attn_layer_norm(a)

    def cross_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.pre_encoder_attn_layer_norm(x)

    def cross_out(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x + self.layer.encoder_attn_layer_norm(a)

    def feed_forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        glu = self.layer.glu
        w, v = linear(glu.ln0(x), *self.fc[0]).split(self.width, dim=-1)
        return x + linear(glu.ln1(F.gelu(w) * v), *self.fc[1])


def _cat(*tensors: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


def _scaled(t: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
    return None if t is None else t * scale


class _CachedDecoder:
    """Incremental decoding over a prior's decoder weights (either architecture) with a static self-attention
    cache."""

    def __init__(self, model: CodePredictor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor,
                 row_source: torch.Tensor, guided: bool = False, matmul_dtype: torch.dtype = torch.float32):
        dec, cfg = model.decoder, model.cfg
        self.model, self.layers = model, dec.layers
        self.heads, self.hd = cfg.attention_heads, cfg.d_model // cfg.attention_heads
        self.scale = self.hd ** -0.5
        n, length = row_source.numel(), cfg.seq_len
        # Guided rows come in pairs that read the same tokens (a candidate and its unconditional twin), and nothing
        # before the first cross-attention sees the caption: the first self-attention block, its cache included,
        # runs on one row of each pair.
        self.pairs = n // 2 if guided else 0
        ref = encoder_hidden
        # head-major (rows, heads, length, hd): each (row, head) reads its prefix as one contiguous run. On a 2-core
        # AVX2 EPYC this sampled 13% (16 candidates, 1 thread) and 15% (64 candidates, 2 threads) faster than a
        # position-major (length, rows, heads, hd) cache, whose prefix is 192-byte pieces 24 KiB apart; on an
        # AVX512 EPYC position-major had measured 9% faster
        self.k_cache = [ref.new_empty(n - self.pairs if i == 0 else n, self.heads, length, self.hd)
                        for i in range(len(self.layers))]
        self.v_cache = [torch.empty_like(k) for k in self.k_cache]
        # Constant cross-attention K/V, projected once per distinct caption and never copied per row: rows of the
        # same caption are contiguous runs, and each run attends with one (heads, rows, hd) x (heads, hd, T) matmul.
        self.cross = [(self._heads_first(layer.encoder_attn.k_proj(encoder_hidden)),
                       self._heads_first(layer.encoder_attn.v_proj(encoder_hidden))) for layer in self.layers]
        bias = torch.zeros(encoder_mask.shape, dtype=encoder_hidden.dtype, device=encoder_hidden.device)
        self.cross_bias = bias.masked_fill(encoder_mask == 0, float("-inf"))[:, None, None, :]  # (S, 1, 1, T)
        src, counts = torch.unique_consecutive(row_source, return_counts=True)
        ends = counts.cumsum(0).tolist()
        self.runs = [(e - c, e, s) for s, c, e in zip(src.tolist(), counts.tolist(), ends)]
        self.dtype = matmul_dtype

        def cast(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
            return tuple(None if t is None else t.to(matmul_dtype) for t in tensors)

        blocks = _DalleBartBlocks if cfg.arch == "dallebart" else _BartBlocks
        self.blocks = [blocks(layer, cast) for layer in self.layers]
        # q, k and v of the new token in one matmul, the 1/sqrt(hd) score scale folded into q
        self.qkv = [cast(torch.cat([l.self_attn.q_proj.weight * self.scale, l.self_attn.k_proj.weight,
                                    l.self_attn.v_proj.weight]),
                         _cat(_scaled(l.self_attn.q_proj.bias, self.scale), l.self_attn.k_proj.bias,
                              l.self_attn.v_proj.bias))
                    for l in self.layers]
        self.cross_q = [cast(l.encoder_attn.q_proj.weight * self.scale, _scaled(l.encoder_attn.q_proj.bias, self.scale))
                        for l in self.layers]
        self.out = [(cast(l.self_attn.out_proj.weight, l.self_attn.out_proj.bias),
                     cast(l.encoder_attn.out_proj.weight, l.encoder_attn.out_proj.bias)) for l in self.layers]
        self.head = cast(model.lm_head.weight[: cfg.codebook_size])[0]

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.dtype == torch.float32:
            return F.linear(x, weight, bias)
        return F.linear(x.to(self.dtype), weight, bias).float()

    def _heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """(S, T, d) -> (S, heads, T, hd)."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.hd).transpose(1, 2)

    def _cross_attention(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """(N, heads, hd) queries -> (N, heads, hd), each run of rows against its own caption's K/V."""
        k, v = self.cross[i]
        out = []
        for lo, hi, src in self.runs:
            qs = q[lo:hi].transpose(0, 1)  # (heads, rows, hd)
            scores = torch.baddbmm(self.cross_bias[src, 0], qs, k[src].transpose(-1, -2))
            out.append((torch.softmax(scores, dim=-1) @ v[src]).transpose(0, 1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) final hidden states -> (N, K) logits over the codebook."""
        return self._linear(hidden, self.head)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """(N,) tokens at position ``pos`` -> (N, d) final hidden states for position ``pos`` (``logits`` turns
        them into the codebook's logits)."""
        if self.pairs:
            tokens = tokens[: self.pairs]
        x = self.model.embed_step(tokens, pos)
        for i, block in enumerate(self.blocks):
            n, (self_out, cross_out) = x.shape[0], self.out[i]
            qkv = self._linear(block.self_in(x), *self.qkv[i]).view(n, 3 * self.heads, 1, self.hd)
            q, k, v = qkv.split(self.heads, dim=1)  # one position: no transpose
            self.k_cache[i][:, :, pos] = k[:, :, 0]
            self.v_cache[i][:, :, pos] = v[:, :, 0]
            # one query against the cache: two batched matmuls beat SDPA's kernel on CPU for this shape
            keys, values = self.k_cache[i][:, :, : pos + 1], self.v_cache[i][:, :, : pos + 1]
            a = torch.softmax(q @ keys.transpose(-1, -2), dim=-1) @ values
            x = block.self_out(x, self._linear(a.transpose(1, 2).reshape(n, 1, -1), *self_out))
            if i == 0 and self.pairs:
                x, n = torch.cat([x, x]), 2 * n
            q = self._linear(block.cross_in(x), *self.cross_q[i]).view(n, self.heads, self.hd)
            x = block.cross_out(x, self._linear(self._cross_attention(i, q).reshape(n, 1, -1), *cross_out))
            x = block.feed_forward(x, self._linear)
        return self.model.final_step(x)[:, 0]


def _run_loop(step: Callable[[torch.Tensor, int], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor], n: int,
              guided: bool, uniforms: torch.Tensor, opts: SamplingOptions, start_id: int, length: int,
              device: torch.device) -> torch.Tensor:
    rows = 2 * n if guided else n
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    out = torch.empty(n, length, dtype=torch.long, device=device)
    for pos in range(length):
        hidden = step(tokens, pos)
        mixed = head(guide(hidden[:n], hidden[n:] if guided else None, opts.condition_scale))
        codes = pick_codes(mixed, uniforms[:, pos], opts)
        out[:, pos] = codes
        tokens = torch.cat([codes, codes]) if guided else codes
    return out


def _encode_rows(model: CodePredictor, text_ids: torch.Tensor, text_mask: torch.Tensor, row_prompt: torch.Tensor,
                 empty_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode the distinct captions (plus the empty one when guided); rows: conditional then unconditional."""
    if empty_ids is not None:
        width = max(text_ids.shape[1], empty_ids.shape[0])
        text_ids = F.pad(text_ids, (0, width - text_ids.shape[1]), value=model.cfg.text_pad_token_id)
        text_mask = F.pad(text_mask, (0, width - text_mask.shape[1]))
        e_ids = F.pad(empty_ids, (0, width - empty_ids.shape[0]), value=model.cfg.text_pad_token_id)
        e_mask = F.pad(torch.ones_like(empty_ids), (0, width - empty_ids.shape[0]))
        text_ids, text_mask = torch.cat([text_ids, e_ids[None]]), torch.cat([text_mask, e_mask[None]])
        row_prompt = torch.cat([row_prompt, torch.full_like(row_prompt, text_ids.shape[0] - 1)])
    return model.encode(text_ids, text_mask), text_mask, row_prompt


@torch.inference_mode()
def sample_codes(model: CodePredictor, text_ids: torch.Tensor, text_mask: torch.Tensor, row_prompt: torch.Tensor,
                 uniforms: torch.Tensor, opts: SamplingOptions, empty_ids: Optional[torch.Tensor] = None,
                 use_cache: bool = True) -> torch.Tensor:
    """Sample one code sequence per row.

    text_ids/text_mask: (P, T) distinct captions; row_prompt: (N,) caption index of each row; uniforms: (N, L)
    from :func:`candidate_uniforms`; empty_ids: the token ids of "" — given, the rows are guided with
    ``opts.condition_scale``; None, plain conditional sampling. ``use_cache=False`` recomputes the whole prefix
    every step (the reference the cache is tested against). Returns (N, L) codes in [0, codebook_size).
    """
    device = next(model.parameters()).device
    n, length, start = row_prompt.numel(), model.cfg.seq_len, model.cfg.start_token_id
    text_ids, text_mask, row_prompt = text_ids.to(device), text_mask.to(device), row_prompt.to(device)
    hidden, mask, rows = _encode_rows(model, text_ids, text_mask, row_prompt,
                                      None if empty_ids is None else empty_ids.to(device))
    guided = empty_ids is not None
    uniforms = uniforms.to(device)
    if use_cache:
        dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
        decoder = _CachedDecoder(model, hidden, mask, rows, guided=guided, matmul_dtype=dtype)
        step, head = decoder.step, decoder.logits
    else:
        row_hidden, row_mask = hidden.index_select(0, rows), mask.index_select(0, rows)
        prefix = torch.full((rows.numel(), 0), start, dtype=torch.long, device=device)
        bf16 = opts.precision == "bf16"

        def step(tokens: torch.Tensor, pos: int) -> torch.Tensor:
            nonlocal prefix
            prefix = torch.cat([prefix, tokens[:, None]], dim=1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model.decode(prefix, row_hidden, row_mask)[:, -1].float()

        def head(h: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model.code_logits(h).float()

    return _run_loop(step, head, n, guided, uniforms, opts, start, length, device)

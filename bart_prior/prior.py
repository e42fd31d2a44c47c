"""BartPrior: the trained prior as one object (network + tokenizer), its folder format, and ``generate``.

Folder: ``config.json`` (PriorConfig) + ``model.safetensors`` + ``tokenizer/`` (a Hugging Face tokenizer folder).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from bart_prior.model import CodePredictor, PriorConfig, build_model
from bart_prior.sampling import SamplingOptions, candidate_seed, candidate_uniforms, resolve_precision, sample_codes
from bart_prior.tokenizer import load_tokenizer
from core.files import atomic_folder, load_safetensors, load_state, read_json, require_files

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_DIR = "config.json", "model.safetensors", "tokenizer"

# Frames in these folders are skipped when a prompt warning names its source line: the line a user wrote (their
# script, generate.py) is more use than torch's inference_mode wrapper or the Pipeline's internals.
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL_DIRS = (os.path.join(_PROJECT, "bart_prior") + os.sep, os.path.join(_PROJECT, "pipeline") + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first caller outside this package, pipeline/ and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class BartPrior(torch.nn.Module):
    def __init__(self, config: PriorConfig, tokenizer, model: Optional[CodePredictor] = None):
        super().__init__()
        # A tokenizer may be larger than the text embedding (DALL·E Mini's vocabulary has one entry more than its
        # 50264 rows): encode_prompts refuses a prompt that reaches past it.
        if config.text_vocab_size is None:
            config.text_vocab_size = len(tokenizer)
        self.config, self.tokenizer = config, tokenizer
        self._normalizer = None
        self.model = model if model is not None else build_model(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.config.grid[0]), int(self.config.grid[1])

    # ---- folder format
    def save_pretrained(self, path: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` + ``tokenizer/`` (atomically: a previous folder stays whole
        until this one is complete)."""
        with atomic_folder(path) as tmp:
            cfg = self.config.to_dict() | {"text_encoder_from": None}  # the weights now live in this folder
            with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
                json.dump(cfg, fh, indent=2)
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", *,
                        map_location: str | torch.device | None = None) -> "BartPrior":
        """Load a ``save_pretrained`` folder onto ``device`` (``map_location`` is its older name)."""
        device = map_location or device
        require_files(path, (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_DIR), "BartPrior",
                      "create one with BartPrior.save_pretrained or `python train.py bart_prior` (runs/NAME/export)")
        config = PriorConfig.from_dict(read_json(os.path.join(path, CONFIG_NAME)),
                                       source=os.path.join(path, CONFIG_NAME))
        prior = cls(config, load_tokenizer(os.path.join(path, TOKENIZER_DIR)))
        weights = os.path.join(path, WEIGHTS_NAME)
        load_state(prior.model, load_safetensors(weights), source=weights)
        return prior.to(device).eval()

    # ---- text
    def encode_prompts(self, prompts: Sequence[str], warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> padded (P, T) ids and mask, truncated to ``max_text_length`` tokens."""
        max_len = self.config.max_text_length
        if self.config.normalize_text:
            if self._normalizer is None:
                from bart_prior.text import TextNormalizer

                self._normalizer = TextNormalizer(self.config.word_frequencies)
            prompts = [self._normalizer(p) for p in prompts]
        # verbose=False: the lengths are only counted here; the warning below says what happens to a long prompt
        full = self.tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if warn and len(ids) > max_len:
                shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
                warnings.warn(f"prompt {shown!r} has {len(ids)} tokens; truncated to {max_len}",
                              stacklevel=_user_stacklevel())
            if warn and not prompt.strip():
                warnings.warn("an empty prompt: its images are unconditional samples",
                              stacklevel=_user_stacklevel())
        enc = self.tokenizer(list(prompts), add_special_tokens=True, truncation=True, max_length=max_len,
                             padding="longest", return_tensors="pt")
        ids = enc["input_ids"]
        if ids.numel() and int(ids.max()) >= self.config.text_vocab_size:
            row = int((ids >= self.config.text_vocab_size).any(1).nonzero()[0])
            raise ValueError(f"prompt {prompts[row]!r} has token id {int(ids[row].max())}, past the text embedding "
                             f"({self.config.text_vocab_size} rows): the tokenizer does not fit the model")
        return ids, enc["attention_mask"]

    def empty_prompt_ids(self) -> torch.Tensor:
        return torch.tensor(self.tokenizer("", add_special_tokens=True)["input_ids"], dtype=torch.long)

    # ---- sampling
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], num_candidates: int = 1,
                 condition_scale: Optional[float] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                 batch_size: Optional[int] = None, use_cache: bool = True,
                 precision: str = "auto") -> torch.LongTensor:
        """Sample ``num_candidates`` code sequences per prompt -> LongTensor (len(prompts), num_candidates, h*w).

        Candidate c of prompt p depends only on (seed, p, c) and the sampling options, not on ``batch_size``
        (candidates per decoder batch; guided batches hold twice as many rows). ``precision``: "fp32", "bf16"
        (matrix products in bf16, attention and sampling in fp32) or "auto" (bf16 where the device is fast at it).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if condition_scale is None:
            condition_scale = self.config.condition_scale
        if temperature is None:
            temperature = self.config.temperature
        if num_candidates < 1 or not prompts:
            raise ValueError("generate needs at least one prompt and num_candidates >= 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.model.training
        self.model.eval()
        text_ids, text_mask = self.encode_prompts(prompts)
        empty = self.empty_prompt_ids() if condition_scale != 1.0 else None
        rows = [(p, c) for p in range(len(prompts)) for c in range(num_candidates)]
        batch_size = batch_size or len(rows)
        decoder_rows = min(batch_size, len(rows)) * (1 if empty is None else 2)
        precision = resolve_precision(precision, next(self.model.parameters()).device, decoder_rows,
                                      self.model.cfg.d_model)
        opts = SamplingOptions(condition_scale, temperature, top_k, top_p, precision)
        length = self.config.seq_len
        out = torch.empty(len(rows), length, dtype=torch.long)
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo: lo + batch_size]
            used = sorted({p for p, _ in chunk})  # encode only the captions this batch needs
            local = {p: i for i, p in enumerate(used)}
            row_prompt = torch.tensor([local[p] for p, _ in chunk])
            uniforms = candidate_uniforms([candidate_seed(seed, p, c) for p, c in chunk], length)
            ids, mask = text_ids[used], text_mask[used]
            width = int(mask.sum(1).max())
            out[lo: lo + len(chunk)] = sample_codes(self.model, ids[:, :width], mask[:, :width], row_prompt,
                                                    uniforms, opts, empty, use_cache=use_cache).cpu()
        self.model.train(was_training)
        return out.view(len(prompts), num_candidates, length)

    @torch.inference_mode()
    def log_likelihood(self, prompts: Sequence[str], codes: torch.Tensor, temperature: Optional[float] = None,
                       batch_size: int = 64, precision: str = "auto") -> torch.Tensor:
        """Teacher-forced log-probability of each candidate's codes given its prompt -> (len(prompts), C) float.

        ``codes``: (P, C, h*w) or (P, h*w), as ``generate`` returns them. The conditional distribution (no guidance)
        is sharpened by ``temperature`` (default: the stored sampling temperature; 0 = greedy scores at 1), so a
        candidate is scored by how the sampler saw it rather than by how rare its tokens are at temperature 1.
        ``batch_size``: sequences per forward pass; the result depends on it only through float rounding.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        codes = torch.as_tensor(codes)
        if codes.dim() == 2:
            codes = codes[:, None]
        if codes.dim() != 3 or codes.shape[0] != len(prompts) or codes.shape[2] != self.config.seq_len:
            raise ValueError(f"codes must be (prompts={len(prompts)}, candidates, {self.config.seq_len}), "
                             f"got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}): the prior's codebook")
        temperature = self.config.temperature if temperature is None else float(temperature)
        temperature = temperature if temperature > 0 else 1.0
        device = next(self.model.parameters()).device
        p, c, length = codes.shape
        # bf16 pays here as in training: every position of every sequence is one row of the matrix products
        bf16 = resolve_precision(precision, device, batch_size * length, self.model.cfg.d_model) == "bf16"
        was_training = self.model.training
        self.model.eval()
        ids, mask = (t.to(device) for t in self.encode_prompts(prompts, warn=False))
        flat, row_prompt = codes.reshape(p * c, length).to(device), torch.arange(p, device=device).repeat_interleave(c)
        out = torch.empty(p * c)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = self.model.encode(ids, mask)
            for lo in range(0, p * c, batch_size):
                rows, seq = row_prompt[lo: lo + batch_size], flat[lo: lo + batch_size]
                logits = self.model(ids[rows], mask[rows], self.model.decoder_inputs(seq), encoder_hidden=hidden[rows])
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                out[lo: lo + len(seq)] = logp.gather(-1, seq[..., None]).squeeze(-1).sum(-1).cpu()
        self.model.train(was_training)
        return out.view(p, c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask, decoder_input_ids)

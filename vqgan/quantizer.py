"""Vector quantizer with straight-through gradients, codebook-health options and usage tracking.

Plain settings (no projection, no L2 norm, no EMA) have exactly taming's parameters: ``embedding.weight``.
Options: cosine codes (L2-normalised), low-dimensional codes behind ``proj_in``/``proj_out``, EMA codebook updates,
and restart of codes unused for a while from recently seen encoder outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, H, W), straight-through: forward = codes, backward = identity to z
    loss: torch.Tensor  # codebook + beta * commitment (commitment only with EMA)
    indices: torch.Tensor  # (B, H, W) long
    commitment: torch.Tensor
    codebook: torch.Tensor


class CodebookUsage(nn.Module):
    """Share of codes used and perplexity over a sliding window of the most recent indices."""

    def __init__(self, num_codes: int, window: int = 65536):
        super().__init__()
        self.num_codes, self.window = num_codes, window
        self.register_buffer("ring", torch.full((window,), -1, dtype=torch.long), persistent=False)
        self.pos = 0

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        flat = indices.detach().reshape(-1).to(self.ring.device)[-self.window:]
        n = flat.numel()
        end = self.pos + n
        if end <= self.window:
            self.ring[self.pos:end] = flat
        else:
            first = self.window - self.pos
            self.ring[self.pos:] = flat[:first]
            self.ring[: n - first] = flat[first:]
        self.pos = end % self.window

    def counts(self) -> torch.Tensor:
        seen = self.ring[self.ring >= 0]
        return torch.bincount(seen, minlength=self.num_codes).float()

    def stats(self) -> dict[str, float]:
        counts = self.counts()
        total = counts.sum()
        if total == 0:
            return {"usage": 0.0, "perplexity": 0.0}
        p = counts / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}

    def reset(self) -> None:
        self.ring.fill_(-1)
        self.pos = 0


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer.

    beta: weight of the commitment term ||z - sg[e]||^2. ``legacy=True`` reproduces taming's default, which puts
    beta on the codebook term instead (||sg[z] - e||^2 * beta + ||z - sg[e]||^2); keep it for converted checkpoints.
    """

    def __init__(self, num_codes: int, embed_dim: int, codebook_dim: Optional[int] = None, beta: float = 0.25,
                 legacy: bool = False, l2_norm: bool = False, ema: bool = False, ema_decay: float = 0.99,
                 restart_dead: bool = False, restart_every: int = 100, restart_threshold: float = 1.0,
                 restart_buffer: int = 8192, usage_window: int = 65536):
        super().__init__()
        self.num_codes, self.embed_dim = num_codes, embed_dim
        self.codebook_dim = codebook_dim or embed_dim
        self.beta, self.legacy, self.l2_norm = beta, legacy, l2_norm
        self.ema, self.ema_decay = ema, ema_decay
        self.restart_dead, self.restart_every, self.restart_threshold = restart_dead, restart_every, restart_threshold
        self.embedding = nn.Embedding(num_codes, self.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        if self.codebook_dim != embed_dim:
            self.proj_in = nn.Linear(embed_dim, self.codebook_dim)
            self.proj_out = nn.Linear(self.codebook_dim, embed_dim)
        else:
            self.proj_in = self.proj_out = None
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone())
        self.usage = CodebookUsage(num_codes, usage_window)
        # recent encoder outputs (codebook space) to restart dead codes from; not part of the state dict
        self.register_buffer("recent", torch.zeros(restart_buffer if restart_dead else 0, self.codebook_dim),
                             persistent=False)
        self.register_buffer("hits", torch.zeros(num_codes), persistent=False)
        self._recent_pos, self._recent_filled, self._calls = 0, 0, 0
        # Restarts draw from their own generator, a function of (run seed, call count): a resumed run makes the same
        # draws however much the global RNG was used around the resume (a data loader starting, for one).
        self._seed = torch.initial_seed()

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def _to_code_space(self, flat: torch.Tensor) -> torch.Tensor:
        if self.proj_in is not None:
            flat = self.proj_in(flat)
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, codebook_dim) vectors in code space -> (N,) indices of the nearest codes by L2."""
        book = self.codebook().float()
        flat = flat.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
        return d.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) indices -> (B, embed_dim, H, W) quantized features (after the output projection)."""
        e = F.embedding(indices, self.codebook())
        if self.proj_out is not None:
            e = self.proj_out(e)
        return e.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, c, h, w = z.shape
        flat = self._to_code_space(z.permute(0, 2, 3, 1).reshape(-1, c))
        idx = self.nearest(flat.detach())
        e = F.embedding(idx, self.codebook()).to(flat.dtype)
        commitment = F.mse_loss(flat, e.detach())
        codebook = F.mse_loss(e, flat.detach()) if not self.ema else flat.new_zeros(())
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = codebook + self.beta * commitment
        q = flat + (e - flat).detach()
        if self.proj_out is not None:
            q = self.proj_out(q)
        z_q = q.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if self.training:
            self._train_updates(flat.detach(), idx)
        return QuantizerOutput(z_q=z_q, loss=loss, indices=idx.reshape(b, h, w), commitment=commitment,
                               codebook=codebook)

    @torch.no_grad()
    def _train_updates(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        self.usage.update(idx)
        if self.ema:
            self._ema_update(flat.float(), idx)
        if self.restart_dead:
            self._remember(flat.float(), idx)
            self._calls += 1
            if self._calls % self.restart_every == 0:
                self.restart_dead_codes()

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot_count = torch.bincount(idx, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        if _dist_ready():
            dist.all_reduce(onehot_count)
            dist.all_reduce(sums)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(onehot_count, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
        self.embedding.weight.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def _remember(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        self.hits += torch.bincount(idx, minlength=self.num_codes).float()
        size = self.recent.shape[0]
        take = flat[torch.randperm(flat.shape[0], generator=self._generator(0)).to(flat.device)[:size]]
        n = take.shape[0]
        pos = torch.arange(self._recent_pos, self._recent_pos + n, device=flat.device) % size
        self.recent[pos] = take
        self._recent_pos = (self._recent_pos + n) % size
        self._recent_filled = min(size, self._recent_filled + n)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self._seed * 1_000_003 + self._calls * 2 + salt) % 2**63)

    def restart_state(self) -> dict:
        """The dead-code restart bookkeeping (hits since the last check, recent encoder outputs, the call counter):
        not in the state dict, which exports share with taming, but needed in training checkpoints so a resumed
        run restarts the same codes at the same step as an uninterrupted one."""
        return {"seed": self._seed, "calls": self._calls, "recent_pos": self._recent_pos,
                "recent_filled": self._recent_filled,
                "hits": self.hits.detach().cpu().clone(), "recent": self.recent.detach().cpu().clone()}

    def load_restart_state(self, state: dict) -> None:
        if state["recent"].shape != self.recent.shape or state["hits"].shape != self.hits.shape:
            raise ValueError(f"checkpoint's dead-code restart buffers {tuple(state['recent'].shape)} / "
                             f"{tuple(state['hits'].shape)} do not fit this quantizer's "
                             f"{tuple(self.recent.shape)} / {tuple(self.hits.shape)}")
        self._seed, self._calls = state["seed"], state["calls"]
        self._recent_pos, self._recent_filled = state["recent_pos"], state["recent_filled"]
        self.hits.copy_(state["hits"])
        self.recent.copy_(state["recent"])

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Move codes hit fewer than ``restart_threshold`` times since the last check onto recent encoder outputs.

        Returns the number of restarted codes. Under DDP all ranks adopt rank 0's choice.
        """
        hits = self.hits.clone()
        if _dist_ready():
            dist.all_reduce(hits)
        dead = (hits < self.restart_threshold).nonzero().flatten()
        self.hits.zero_()
        if dead.numel() == 0 or self._recent_filled == 0:
            return 0
        g = self._generator(1)
        pick = torch.randint(0, self._recent_filled, (dead.numel(),), generator=g).to(dead.device)
        new = self.recent[pick]
        noise = torch.randn(new.shape, generator=g).to(new)
        new = new + 1e-3 * new.std().clamp_min(1e-6) * noise  # duplicates must not coincide
        weight = self.embedding.weight
        weight.data[dead] = new.to(weight.dtype)
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = new
        if _dist_ready():
            dist.broadcast(weight.data, 0)
            if self.ema:
                dist.broadcast(self.ema_count, 0)
                dist.broadcast(self.ema_sum, 0)
        return int(dead.numel())

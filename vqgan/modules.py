"""Encoder and decoder of the taming-transformers VQGAN design (pure nn.Module).

Parameter names and shapes follow taming's ``VQModel`` (``conv_in``, ``down.{i}.block.{j}``, ``mid.attn_1``,
``up.{i}.upsample``, ``norm_out``...) so that its public checkpoints load strictly; the code itself is independent.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    # taming uses 32 groups and eps 1e-6 (min-dalle's port keeps torch's 1e-5, hence a parameter); narrower models
    # (tests, the CPU demo) need fewer groups.
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=eps, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming names the 1x1 projection of the skip path `nin_shortcut`
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (taming's layout)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = group_norm(channels, groups, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming's (and min-dalle's) matrix products, not scaled_dot_product_attention: the published decoders then
        # decode to within float rounding of their own code (1e-7 against 1e-5 with the fused kernel); this block
        # runs once or twice per image at the lowest resolution, so its speed hardly matters
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / c ** 0.5, dim=2)  # (b, queries, keys)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric right/bottom padding, as in taming, keeps pretrained weights aligned
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, attention: bool, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups, eps)
        self.attn_1 = AttnBlock(channels, groups, eps) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """images (B, in_channels, R, R) -> features (B, z_channels, R / 2^(L-1), R / 2^(L-1)), L = len(ch_mult)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 z_channels: int, resolution: int, in_channels: int = 3, dropout: float = 0.0,
                 norm_groups: int = 32, mid_attention: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        levels = []
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, dropout, norm_groups, norm_eps))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, norm_groups, norm_eps))
            last = i == len(ch_mult) - 1
            levels.append(_Level(blocks, attns, None if last else Downsample(c_out), "downsample"))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, dropout, norm_groups, mid_attention, norm_eps)
        self.norm_out = group_norm(c_in, norm_groups, norm_eps)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """features (B, z_channels, r, r) -> images (B, out_channels, r * 2^(L-1), ...); no output squashing."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 z_channels: int, resolution: int, out_channels: int = 3, dropout: float = 0.0,
                 norm_groups: int = 32, mid_attention: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, dropout, norm_groups, mid_attention, norm_eps)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):  # the decoder has one more block per level than the encoder
                blocks.append(ResnetBlock(c_in, c_out, dropout, norm_groups, norm_eps))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, norm_groups, norm_eps))
            levels.insert(0, _Level(blocks, attns, Upsample(c_out) if i != 0 else None, "upsample"))
            res = res * 2 if i != 0 else res
        # indexed by level (up[0] is the full-resolution level), executed from the coarsest
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, norm_groups, norm_eps)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight at which the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))

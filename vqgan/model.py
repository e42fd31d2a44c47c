"""The VQGAN image tokenizer: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (pure nn.Module)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vqgan.modules import Decoder, Encoder
from vqgan.quantizer import QuantizerOutput, VectorQuantizer

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A weights folder or checkpoint that does not match the model; the message names the first bad key."""


@dataclass
class VQGANConfig:
    resolution: int = 64
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    mid_attention: bool = True
    z_channels: int = 64
    dropout: float = 0.0
    norm_groups: int = 32
    # quantizer; the defaults are the settings that use the codebook best (low-dim cosine codes + restarts)
    num_codes: int = 1024
    embed_dim: int = 64
    codebook_dim: Optional[int] = 8  # None = embed_dim (taming: no projections)
    beta: float = 0.25
    legacy_commitment: bool = False  # True: taming's beta placement (for converted checkpoints)
    l2_norm_codes: bool = True
    ema: bool = False
    ema_decay: float = 0.99
    restart_dead: bool = True
    restart_every: int = 200  # training forward passes between dead-code checks
    restart_threshold: float = 1.0  # hits since the last check below which a code counts as dead
    usage_window: int = 65536

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_grid(self) -> int:
        return self.resolution // self.downsample_factor

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"unknown VQGAN config key '{unknown[0]}'")
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TAMING_QUANT = dict(codebook_dim=None, l2_norm_codes=False, ema=False, restart_dead=False, legacy_commitment=False)

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a few thousand parameters, 32 px, 8x8 tokens
    "tiny": dict(resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, embed_dim=8, norm_groups=4,
                 num_codes=64, codebook_dim=4, mid_attention=False, restart_every=20),
    # the CPU demo on 64 px flat-colour shapes: 16x16 tokens, narrow, no attention
    "shapes": dict(resolution=64, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=32, embed_dim=32,
                   norm_groups=8, num_codes=512, codebook_dim=8, mid_attention=False, restart_every=50),
    # taming's ImageNet f16 architecture with 16384 codes (the checkpoint dalle-mini fine-tuned)
    "f16-16384": dict(resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                      z_channels=256, embed_dim=256, num_codes=16384, norm_groups=32, **_TAMING_QUANT),
}


def preset(name: str, **overrides: Any) -> VQGANConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown VQGAN preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return VQGANConfig(**{**PRESETS[name], **overrides})


class VQGAN(nn.Module):
    """Images in [-1, 1] <-> integer codes (B, h, w)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = c = config
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                    z_channels=c.z_channels, resolution=c.resolution, dropout=c.dropout, norm_groups=c.norm_groups,
                    mid_attention=c.mid_attention)
        self.encoder = Encoder(in_channels=c.in_channels, **arch)
        self.decoder = Decoder(out_channels=c.out_channels, **arch)
        self.quantize = VectorQuantizer(
            c.num_codes, c.embed_dim, codebook_dim=c.codebook_dim, beta=c.beta, legacy=c.legacy_commitment,
            l2_norm=c.l2_norm_codes, ema=c.ema, ema_decay=c.ema_decay, restart_dead=c.restart_dead,
            restart_every=c.restart_every, restart_threshold=c.restart_threshold, usage_window=c.usage_window)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.num_codes

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid of one image."""
        return (self.config.token_grid, self.config.token_grid)

    @property
    def image_size(self) -> int:
        return self.config.resolution

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        f = self.config.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the downsampling factor {f}")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the convolutions' memory format: NHWC inputs for NHWC weights (``from_pretrained`` and
        ``optim.channels_last`` training); a mismatch makes oneDNN convert at every layer."""
        if self.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def quantize_images(self, images: torch.Tensor) -> QuantizerOutput:
        self._check_images(images)
        return self.quantize(self.quant_conv(self.encoder(self._layout(images))))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self._layout(z_q)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training pass: (reconstruction without clamping, quantizer output with loss and indices)."""
        q = self.quantize_images(images)
        return self.decode_latents(q.z_q), q

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, H/f, W/f) LongTensor codes."""
        was = self.training
        self.eval()
        try:
            return self.quantize_images(images).indices
        finally:
            self.train(was)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer codes -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes (B, h, w), got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.num_codes):
            raise ValueError(f"codes must lie in [0, {self.config.num_codes}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.decode_latents(self.quantize.lookup(codes)).clamp(-1, 1)

    def save_pretrained(self, out_dir: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` into a temporary folder, then rename it into place."""
        out_dir = os.path.abspath(out_dir)
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
        try:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
                json.dump(self.config.to_dict(), fh, indent=2)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            if os.path.isdir(out_dir):
                old = out_dir + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, model_dir: str, map_location: str = "cpu") -> "VQGAN":
        cfg_path, w_path = os.path.join(model_dir, CONFIG_NAME), os.path.join(model_dir, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} not found: pass a folder written by VQGAN.save_pretrained, a training "
                                        f"run's export/ folder, or convert a taming checkpoint with "
                                        f"`python -m vqgan.convert_taming`")
        with open(cfg_path) as fh:
            config = VQGANConfig.from_dict(json.load(fh))
        model = cls(config)
        load_state_strict(model, load_file(w_path, device=map_location), source=w_path)
        # NHWC: on one CPU thread the shapes VQGAN encoded 1.6x and decoded 1.9x faster (2 threads: 1.05x / 1.25x),
        # with the same codes; save_pretrained writes the usual contiguous layout
        return model.to(memory_format=torch.channels_last).eval()


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with a one-line error naming the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    for key in own:
        if key not in state:
            raise CheckpointError(f"{source}: missing key '{key}' (expected shape {tuple(own[key].shape)})")
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{source}: unexpected key '{key}' (shape {tuple(value.shape)})")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: key '{key}' has shape {tuple(value.shape)}, "
                                  f"model expects {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=True)

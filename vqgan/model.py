"""The VQGAN image tokenizer: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (pure nn.Module)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from core.configs import check_field_types, model_preset
from core.errors import ModelFolderError
from core.files import atomic_folder, load_safetensors, load_state, read_json, require_files
from vqgan.modules import Decoder, Encoder
from vqgan.quantizer import QuantizerOutput, VectorQuantizer

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


# A weights folder or checkpoint that does not match the model (the message names the first bad tensor).
CheckpointError = ModelFolderError

PIXEL_RANGES = ("-1,1", "0,1")
NO_ENCODER = ("this VQGAN was imported without an encoder (min-dalle's detoker.pt holds only the decoder and the "
              "codebook): it decodes codes but cannot encode images; for an encoder convert dalle-mini's VQGAN "
              "(python -m vqgan.convert --from dalle-mini DIR --out OUT) or a taming checkpoint (--from taming CKPT)")


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
    # GroupNorm epsilon: taming's (and dalle-mini's vqgan-jax) 1e-6; min-dalle's detokenizer keeps torch's default
    # 1e-5, which its detoker.pt was used with, so an imported detoker.pt decodes exactly as min-dalle does.
    norm_eps: float = 1e-6
    # The pixel range the convolutions see: "-1,1" (taming) or "0,1" (dalle-mini's fine-tuned VQGAN and min-dalle).
    # encode/decode and the training pass always take and give [-1, 1] images; the conversion happens at the edge.
    pixel_range: str = "-1,1"
    # False: decoder and codebook only (min-dalle's detoker.pt has no encoder): decodes codes, cannot encode images.
    encoder: bool = True
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

    def __post_init__(self) -> None:
        sizes = {"resolution": self.resolution, "ch": self.ch, "z_channels": self.z_channels,
                 "num_codes": self.num_codes, "embed_dim": self.embed_dim, "norm_groups": self.norm_groups,
                 "restart_every": self.restart_every, "usage_window": self.usage_window,
                 "codebook_dim": 1 if self.codebook_dim is None else self.codebook_dim}
        for name, value in sizes.items():  # a zero-entry codebook divides by zero in the quantizer's init
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of factors >= 1, got {self.ch_mult}")
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {', '.join(repr(r) for r in PIXEL_RANGES)}, "
                             f"got {self.pixel_range!r}")

    def require_encoder(self, where: str) -> None:
        """ModelFolderError (one line) if this VQGAN has no encoder; ``where`` names the model folder."""
        if not self.encoder:
            raise ModelFolderError(f"{where}: {NO_ENCODER}")

    def check_same_function(self, made_with: "VQGANConfig", source: str) -> None:
        """ModelFolderError if weights made under ``made_with`` would compute something else here through a setting
        no tensor shape shows (a fine-tune of converted weights with the wrong pixel range trains silently)."""
        for key in ("pixel_range", "norm_eps", "norm_groups"):
            theirs, ours = getattr(made_with, key), getattr(self, key)
            if theirs != ours:
                raise ModelFolderError(f"{source}: the weights were made with {key} {theirs!r}, this model has "
                                       f"{ours!r}; set model.{key}: {theirs}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_grid(self) -> int:
        return self.resolution // self.downsample_factor

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "VQGAN config") -> "VQGANConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelFolderError(f"{source}: unknown VQGAN config key '{unknown[0]}'")
        check_field_types(cls, d, source, ModelFolderError)
        try:
            return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})
        except ValueError as exc:
            raise ModelFolderError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset(name: str, **overrides: Any) -> VQGANConfig:
    """The model size of a shipped config (the ``model:`` section of configs/vqgan/NAME.yaml: tiny, shapes,
    f16-16384, ...) with ``overrides``."""
    return VQGANConfig.from_dict({**model_preset("vqgan", name), **overrides})


class VQGAN(nn.Module):
    """Images in [-1, 1] <-> integer codes (B, h, w)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = c = config
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                    z_channels=c.z_channels, resolution=c.resolution, dropout=c.dropout, norm_groups=c.norm_groups,
                    mid_attention=c.mid_attention, norm_eps=c.norm_eps)
        self.encoder: Optional[Encoder] = Encoder(in_channels=c.in_channels, **arch) if c.encoder else None
        self.decoder = Decoder(out_channels=c.out_channels, **arch)
        self.quantize = VectorQuantizer(
            c.num_codes, c.embed_dim, codebook_dim=c.codebook_dim, beta=c.beta, legacy=c.legacy_commitment,
            l2_norm=c.l2_norm_codes, ema=c.ema, ema_decay=c.ema_decay, restart_dead=c.restart_dead,
            restart_every=c.restart_every, restart_threshold=c.restart_threshold, usage_window=c.usage_window)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1) if c.encoder else None
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
        if self.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def quantize_images(self, images: torch.Tensor) -> QuantizerOutput:
        """[-1, 1] images -> quantizer output (the encoder sees them in ``config.pixel_range``)."""
        if self.encoder is None or self.quant_conv is None:
            raise ModelFolderError(NO_ENCODER)
        self._check_images(images)
        if self.config.pixel_range == "0,1":
            images = (images + 1) / 2
        return self.quantize(self.quant_conv(self.encoder(self._layout(images))))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents -> unclamped images in [-1, 1] (from the decoder's ``config.pixel_range``)."""
        x = self.decoder(self.post_quant_conv(self._layout(z_q)))
        return x * 2 - 1 if self.config.pixel_range == "0,1" else x

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

    def save_pretrained(self, path: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` (atomically: a previous folder stays whole until this one is
        complete)."""
        with atomic_folder(path) as tmp:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
                json.dump(self.config.to_dict(), fh, indent=2)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", *,
                        map_location: str | torch.device | None = None) -> "VQGAN":
        """Load a ``save_pretrained`` folder onto ``device`` (``map_location`` is its older name)."""
        device = map_location or device
        require_files(path, (CONFIG_NAME, WEIGHTS_NAME), "VQGAN",
                      "pass a folder written by VQGAN.save_pretrained (a training run's export/ folder), or convert "
                      "a taming, dalle-mini or min-dalle checkpoint with `python -m vqgan.convert`")
        config = VQGANConfig.from_dict(read_json(os.path.join(path, CONFIG_NAME)), source=os.path.join(path, CONFIG_NAME))
        model = cls(config)
        weights = os.path.join(path, WEIGHTS_NAME)
        load_state(model, load_safetensors(weights), source=weights)
        # NHWC: on one CPU thread the shapes VQGAN encoded 1.6x and decoded 1.9x faster (2 threads: 1.05x / 1.25x),
        # with the same codes; save_pretrained writes the usual contiguous layout
        return model.to(device).to(memory_format=torch.channels_last).eval()


# The older name of core.files.load_state: load_state_dict(strict) with a one-line error naming the first bad tensor.
load_state_strict = load_state

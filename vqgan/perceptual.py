"""LPIPS (VGG) perceptual distance with the backbone read from a local file, never downloaded mid-run.

lpips 0.1.4 ships only its linear heads; it would fetch VGG16 through torchvision. We build it with a random
backbone and fill the VGG16 feature weights in from ``backbone`` (a path), torchvision's cache, or keep them random
when ``backbone == "random"`` (tests only).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Optional

import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's file name for IMAGENET1K_V1


class LPIPSWeightsMissing(FileNotFoundError):
    """The VGG16 backbone for LPIPS is not on disk."""


def torchvision_cache_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def resolve_backbone(backbone: Optional[str]) -> Optional[str]:
    """The VGG16 weight file to use: ``None`` for 'random', else an existing path; raises with instructions."""
    if backbone == "random":
        return None
    path = os.path.expanduser(backbone) if backbone else torchvision_cache_path()
    if not os.path.isfile(path):
        where = "" if not backbone else f" (or put it in torchvision's cache, {torchvision_cache_path()})"
        raise LPIPSWeightsMissing(
            f"LPIPS needs torchvision's VGG16 ImageNet weights '{VGG16_FILE}', but {path} does not exist: copy the "
            f"file there{where} or point loss.lpips_backbone at it; or set loss.perceptual_weight=0 to train without "
            f"LPIPS (loss.lpips_backbone=random gives a random backbone, for tests only)")
    return path


def _load_vgg_features(net: nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not feats:
        raise LPIPSWeightsMissing(f"{path} does not look like a torchvision VGG16 state dict (no 'features.*' keys)")
    for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
        part = getattr(net, slice_name)
        part.load_state_dict({k: feats[k] for k in part.state_dict()}, strict=True)


def build_lpips(backbone: Optional[str]) -> nn.Module:
    """An ``lpips.LPIPS`` VGG model, frozen, in eval mode. Raises :class:`LPIPSWeightsMissing` when absent."""
    path = resolve_backbone(backbone)  # fail before the slow import and VGG construction
    import lpips

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # lpips' prints, tv deprecations
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_vgg_features(model.net, path)
    return model.eval().requires_grad_(False)


class FrozenLPIPS(nn.Module):
    """LPIPS distance held outside the module tree, so it stays out of state dicts, DDP and optimizers,
    while ``.to()`` and friends still move it with its owner."""

    def __init__(self, backbone: Optional[str]):
        super().__init__()
        object.__setattr__(self, "net", build_lpips(backbone))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance (B,) for images in [-1, 1]."""
        return self.net(x, y).flatten()

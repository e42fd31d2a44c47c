"""VQGAN training loss: pixel (L1/L2) + LPIPS + adversarial with taming's adaptive weight; owns the PatchGAN."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vqgan.perceptual import FrozenLPIPS


@dataclass
class LossConfig:
    pixel_loss: str = "l1"  # l1 | l2
    pixel_weight: float = 1.0
    gradient_weight: float = 0.0  # the pixel loss on image gradients (finite differences): edges, no weights needed
    perceptual_weight: float = 1.0  # LPIPS (VGG); 0 turns it off and needs no weights
    lpips_backbone: Optional[str] = None  # path to vgg16-397923af.pth; None: torchvision's cache; "random": tests
    codebook_weight: float = 1.0
    disc_weight: float = 0.75  # 0 turns the GAN off
    disc_loss: str = "hinge"  # hinge | non_saturating
    disc_start: int = 0  # generator steps before the GAN term starts
    disc_start_fraction: Optional[float] = None  # if set, disc_start = fraction * trainer.max_steps
    disc_layers: int = 3
    disc_ndf: int = 64
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4


class LossConfigError(ValueError):
    pass


class NLayerDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs, BatchNorm, LeakyReLU(0.2); one logit per receptive-field patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)  # taming's attribute name, so its `loss.discriminator.*` keys fit
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_value: float = 1e4) -> torch.Tensor:
    """taming's balance: ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_value], no gradient."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_value).detach()


class VQLoss(nn.Module):
    def __init__(self, cfg: LossConfig, in_channels: int = 3):
        super().__init__()
        if cfg.pixel_loss not in ("l1", "l2"):
            raise LossConfigError(f"loss.pixel_loss must be l1 or l2, got '{cfg.pixel_loss}'")
        if cfg.disc_loss not in ("hinge", "non_saturating"):
            raise LossConfigError(f"loss.disc_loss must be hinge or non_saturating, got '{cfg.disc_loss}'")
        self.cfg = cfg
        self.perceptual = FrozenLPIPS(cfg.lpips_backbone) if cfg.perceptual_weight > 0 else None
        self.discriminator = (NLayerDiscriminator(in_channels, cfg.disc_ndf, cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)
        self.disc_start = cfg.disc_start

    def set_max_steps(self, max_steps: int) -> None:
        if self.cfg.disc_start_fraction is not None:
            self.disc_start = int(self.cfg.disc_start_fraction * max(0, max_steps))

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def pixel(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(xrec, x) if self.cfg.pixel_loss == "l1" else F.mse_loss(xrec, x)

    def gradient(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        """The pixel loss between horizontal and vertical differences of neighbours: a blurred edge costs here even
        where it costs little per pixel (a small object is a few percent of the image)."""
        return 0.5 * (self.pixel(x.diff(dim=-1), xrec.diff(dim=-1)) + self.pixel(x.diff(dim=-2), xrec.diff(dim=-2)))

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, q_loss: torch.Tensor, last_layer: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder + codebook objective; ``last_layer`` is the decoder's output conv weight."""
        c = self.cfg
        logs: dict[str, torch.Tensor] = {}
        rec = self.pixel(x, xrec)
        nll = c.pixel_weight * rec
        logs["rec"] = rec.detach()
        if c.gradient_weight > 0:
            g_rec = self.gradient(x, xrec)
            nll = nll + c.gradient_weight * g_rec
            logs["grad"] = g_rec.detach()
        if self.perceptual is not None:
            p = self.perceptual(x.float(), xrec.float()).mean()
            nll = nll + c.perceptual_weight * p
            logs["lpips"] = p.detach()
        logs["nll"] = nll.detach()
        loss = nll + c.codebook_weight * q_loss
        if self.gan_active(step):
            logits_fake = self.discriminator(xrec)
            g = (-logits_fake.float().mean() if c.disc_loss == "hinge"
                 else F.softplus(-logits_fake.float()).mean())
            lam = (adaptive_weight(nll, g, last_layer, c.adaptive_weight_max) if c.adaptive_weight and self.training
                   else torch.ones((), device=x.device))
            loss = loss + c.disc_weight * lam * g
            logs.update(g=g.detach(), adaptive_weight=lam, logits_fake_g=logits_fake.detach().float().mean())
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PatchGAN loss on real images and detached reconstructions."""
        real = self.discriminator(x.detach()).float()
        fake = self.discriminator(xrec.detach()).float()
        if self.cfg.disc_loss == "hinge":
            d = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        else:
            d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
        return d, {"d": d.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}

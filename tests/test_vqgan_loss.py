"""VQGAN loss: adaptive GAN weight by hand, discriminator start, LPIPS backbone loading and its start-up error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._vqgan_helpers import one_thread  # noqa: F401  (autouse fixture)
from vqgan.loss import LossConfig, NLayerDiscriminator, VQLoss, adaptive_weight
from vqgan.perceptual import LPIPSWeightsMissing


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    h = torch.randn(2, 4, 3, 3)  # decoder features before the last 1x1 conv
    x = torch.randn(2, 3, 3, 3)
    W = torch.randn(3, 4, 1, 1, requires_grad=True)  # "last layer"
    a = torch.randn(1, 3, 1, 1)  # a linear 1x1 "discriminator"
    xrec = F.conv2d(h, W)
    nll = ((xrec - x) ** 2).mean()
    g = -(F.conv2d(xrec, a)).mean()
    lam = adaptive_weight(nll, g, W)
    n = xrec.numel()
    # d nll / dW[o, i] = 2/N * sum_{b,y,x} (xrec - x)[b,o] h[b,i];  d g / dW[o, i] = -a[o] / (N/3) * sum h[b,i]
    grad_nll = 2.0 / n * torch.einsum("bohw,bihw->oi", xrec.detach() - x, h)
    grad_g = -torch.einsum("o,bihw->oi", a.flatten(), h) / (n / 3)
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert float(lam) == pytest.approx(float(expected), rel=1e-5)
    assert not lam.requires_grad
    huge = adaptive_weight(nll, g * 1e-12, W, max_value=1e4)
    assert float(huge) == pytest.approx(1e4)  # clamped


def test_discriminator_start_in_steps_and_as_fraction():
    loss = VQLoss(LossConfig(perceptual_weight=0, disc_start=5, disc_ndf=8, disc_layers=2))
    assert not loss.gan_active(4) and loss.gan_active(5)
    loss = VQLoss(LossConfig(perceptual_weight=0, disc_start_fraction=0.25, disc_ndf=8))
    loss.set_max_steps(400)
    assert not loss.gan_active(99) and loss.gan_active(100)
    assert VQLoss(LossConfig(perceptual_weight=0, disc_weight=0)).discriminator is None


def test_patchgan_layout_and_generator_terms():
    d = NLayerDiscriminator(3, ndf=64, n_layers=3)
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    torch.manual_seed(0)
    loss = VQLoss(LossConfig(perceptual_weight=0, disc_ndf=8, disc_layers=2, disc_loss="non_saturating"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    last = nn.Conv2d(3, 3, 1)
    xrec = last(x + 0.1)
    total, logs = loss.generator_loss(x, xrec, torch.tensor(0.5), last.weight, step=0)
    logits = loss.discriminator(xrec)
    expected = F.l1_loss(xrec, x) + 0.5 + 0.75 * logs["adaptive_weight"] * F.softplus(-logits).mean()
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    d, dlogs = loss.discriminator_loss(x, xrec)
    assert {"d", "logits_real", "logits_fake"} <= set(dlogs) and d.requires_grad


def test_gradient_loss_charges_blurred_edges_not_flat_offsets():
    loss = VQLoss(LossConfig(pixel_loss="l2", gradient_weight=2.0, perceptual_weight=0, disc_weight=0))
    x = -torch.ones(1, 3, 16, 16)
    x[..., 6:10, 6:10] = 1.0  # a small sharp square
    shifted = x + 0.2  # same edges, every pixel off
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert float(loss.gradient(x, shifted)) == pytest.approx(0.0, abs=1e-7)
    assert float(loss.gradient(x, blurred)) > 0.05
    # hand computation: mean squared difference of horizontal and vertical neighbour differences, averaged
    dx = ((x.diff(dim=-1) - blurred.diff(dim=-1)) ** 2).mean()
    dy = ((x.diff(dim=-2) - blurred.diff(dim=-2)) ** 2).mean()
    assert float(loss.gradient(x, blurred)) == pytest.approx(float(0.5 * (dx + dy)), rel=1e-6)
    total, logs = loss.generator_loss(x, blurred, torch.tensor(0.0), torch.zeros(1), step=0)
    assert float(total) == pytest.approx(float(F.mse_loss(blurred, x) + 2.0 * logs["grad"]), rel=1e-6)
    assert "grad" not in VQLoss(LossConfig(perceptual_weight=0, disc_weight=0)).generator_loss(
        x, blurred, torch.tensor(0.0), torch.zeros(1), step=0)[1]


def test_missing_lpips_weights_stop_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(LPIPSWeightsMissing) as info:
        VQLoss(LossConfig(perceptual_weight=1.0))
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "perceptual_weight=0" in msg and "\n" not in msg
    with pytest.raises(LPIPSWeightsMissing, match="nowhere.pth"):
        VQLoss(LossConfig(lpips_backbone=str(tmp_path / "nowhere.pth")))
    assert VQLoss(LossConfig(perceptual_weight=0)).perceptual is None  # no weights needed


def test_lpips_backbone_loads_from_local_file_and_stays_out_of_state_dict(tmp_path):
    torch.manual_seed(0)
    # a torchvision-style VGG16 state dict: the 13 conv layers of `features` (LPIPS uses all of them)
    feats, c_in, i = {}, 3, 0
    for c_out in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if c_out == "M":
            i += 1
            continue
        feats[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3) * 0.05
        feats[f"features.{i}.bias"] = torch.randn(c_out) * 0.05
        c_in, i = c_out, i + 2
    torch.save(feats, tmp_path / "vgg16-397923af.pth")
    loss = VQLoss(LossConfig(lpips_backbone=str(tmp_path / "vgg16-397923af.pth"), disc_weight=0))
    assert torch.equal(loss.perceptual.net.net.slice3._modules['10'].weight, feats["features.10.weight"])
    assert not any(k.startswith("perceptual") for k in loss.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = loss.perceptual(x, x.flip(0))
    assert d.shape == (2,) and float(loss.perceptual(x, x).abs().max()) < 1e-6
    xrec = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    total, logs = loss.generator_loss(x, xrec, torch.tensor(0.0), xrec, step=0)
    assert float(total.detach()) == pytest.approx(float((F.l1_loss(xrec, x) + logs["lpips"]).detach()), rel=1e-5)
    total.backward()
    assert xrec.grad.abs().sum() > 0  # LPIPS is differentiable w.r.t. the reconstruction

"""taming-transformers' own VQGAN training modules, importable without their Lightning 1.x entry point.

``taming.models.vqgan`` imports ``taming.main`` (Lightning 1.x's ``rank_zero_only`` and friends) only for
``instantiate_from_config``; ``taming.util`` imports ``requests`` only to download the LPIPS weights. Both are
stood in for here, taming's VGG16 is built with random weights (torchvision would download ImageNet weights, and
LPIPS its linear heads): the same cost as the real weights, as the random backbone of this project's bench.
Everything else is taming's code as installed (PyPI ``taming-transformers-rom1504``, ``--no-deps``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import torch

# taming's configs/vqgan_imagenet_f16_16384.yaml
F16_DDCONFIG = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
F16_LOSS = dict(disc_conditional=False, disc_in_channels=3, disc_start=0, disc_weight=0.75, codebook_weight=1.0)


def _instantiate_from_config(config: dict) -> Any:
    """taming.main.instantiate_from_config: ``target`` (a dotted name) called with ``params``."""
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", dict()))


def import_taming() -> types.SimpleNamespace:
    """taming's VQModel and VQLPIPSWithDiscriminator classes, with the stand-ins above in place."""
    if "taming.main" not in sys.modules:
        main = types.ModuleType("taming.main")
        main.instantiate_from_config = _instantiate_from_config
        sys.modules["taming.main"] = main
    if "requests" not in sys.modules and importlib.util.find_spec("requests") is None:
        sys.modules["requests"] = types.ModuleType("requests")  # only taming.util's download uses it
    import torchvision

    from taming.modules.losses import lpips as taming_lpips

    def vgg16(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return torchvision.models.vgg16(weights=None)

    taming_lpips.models = types.SimpleNamespace(vgg16=vgg16)
    taming_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    from taming.models.vqgan import VQModel
    from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

    return types.SimpleNamespace(VQModel=VQModel, VQLPIPSWithDiscriminator=VQLPIPSWithDiscriminator)


def build_model(ddconfig: dict, n_embed: int, embed_dim: int, loss: dict, device: str = "cpu",
                lr: float = 1e-4) -> tuple[Any, list[torch.optim.Optimizer]]:
    """taming's VQModel with its VQLPIPSWithDiscriminator loss (``loss``: its parameters) and its own optimizers
    (``configure_optimizers``: Adam, betas (0.5, 0.9))."""
    taming = import_taming()
    lossconfig = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": loss}
    model = taming.VQModel(ddconfig=ddconfig, lossconfig=lossconfig, n_embed=n_embed, embed_dim=embed_dim).to(device)
    model.learning_rate = lr
    optimizers, _ = model.configure_optimizers()
    return model.train(), optimizers


def f16_model(device: str = "cpu", lr: float = 1e-4) -> tuple[Any, list[torch.optim.Optimizer]]:
    """taming's f16-16384 model (configs/vqgan_imagenet_f16_16384.yaml) with the GAN on from step 0."""
    return build_model(F16_DDCONFIG, 16384, 256, F16_LOSS, device, lr)


def training_step(model: Any, optimizers: list[torch.optim.Optimizer], x: torch.Tensor, global_step: int) -> None:
    """One taming training step as Lightning 1.x runs ``VQModel.training_step`` with two optimizers: for each
    optimizer in turn, only its parameters require grad (``toggle_optimizer``), ``training_step(batch, i, idx)``
    runs (each call does its own generator forward: ``xrec, qloss = self(x)``), then backward and step."""
    groups = [[p for g in opt.param_groups for p in g["params"]] for opt in optimizers]
    everything = [p for p in model.parameters()]
    was = {id(p): p.requires_grad for p in everything}
    for idx, (opt, params) in enumerate(zip(optimizers, groups)):
        mine = {id(p) for p in params}
        for p in everything:  # Lightning 1.x toggle_optimizer
            p.requires_grad = was[id(p)] and id(p) in mine
        xrec, qloss = model(x)
        loss, _ = model.loss(qloss, x, xrec, idx, global_step, last_layer=model.get_last_layer(), split="train")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in everything:
        p.requires_grad = was[id(p)]

"""VQGAN training as a LightningModule: manual optimisation with an autoencoder and a discriminator optimizer.

Step semantics: ``trainer.global_step`` (and so ``trainer.max_steps``, ``loss.disc_start`` and checkpoint names)
counts *generator* optimizer steps. Lightning 2.x counts every optimizer step in manual optimisation, so the
discriminator step is taken with the loop's step counter detached (see :func:`_step_uncounted`). Gradient
accumulation is done here over ``trainer.accumulate_grad_batches`` micro-batches (Lightning refuses that setting
for manual optimisation, so the Trainer must be built with 1 — launch.trainer does so for this component).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from core.files import init_from, read_json
from core.hardware import resolve_channels_last
from launch.components import Component
from launch.schedule import budget_spent, lr_factor
from launch.config import ConfigError, RunConfig
from launch.images import log_image_grid
from vqgan.loss import LossConfig, VQLoss
from vqgan.model import CONFIG_NAME, VQGAN, WEIGHTS_NAME, VQGANConfig


@dataclass
class VQGANOptimConfig:
    lr: float = 2e-4  # autoencoder + codebook (Adam)
    disc_lr: Optional[float] = None  # defaults to lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the autoencoder lr, in generator steps
    decay: str = "constant"  # then cosine | linear | constant, down to lr * min_lr_ratio at trainer.max_steps
    #   (or at the end of trainer.max_time when that ends the run first: launch/schedule.py)
    min_lr_ratio: float = 0.05
    grad_clip: Optional[float] = 1.0  # max grad norm, autoencoder
    disc_grad_clip: Optional[float] = 1.0  # max grad norm, discriminator
    # NHWC convolutions: true | false | auto (core.hardware.resolve_channels_last: NHWC on GPUs and AVX512 CPUs, NCHW
    # on AVX2 CPUs, where the NHWC backward pass measured up to 1.7x slower)
    channels_last: Any = "auto"
    val_grid_images: int = 8  # originals + reconstructions in the validation grid


@dataclass
class EvalConfig:
    # score val reconstructions against their captions with the shapes oracle (data.oracle): val/oracle_*
    shapes_oracle: bool = False


@dataclass
class VQGANRunConfig(RunConfig):
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: VQGANOptimConfig = field(default_factory=VQGANOptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _step_uncounted(opt: Any) -> None:
    """optimizer.step() through Lightning (precision, strategy) without advancing trainer.global_step."""
    before, after = opt._on_before_step, opt._on_after_step
    opt._on_before_step = opt._on_after_step = lambda: None
    try:
        opt.step()
    finally:
        opt._on_before_step, opt._on_after_step = before, after


class VQGANModule(pl.LightningModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.save_hyperparameters(OmegaConf.to_container(cfg, resolve=True))
        self.cfg = cfg
        self.automatic_optimization = False
        self.vqgan = VQGAN(VQGANConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
        if cfg.get("init_from"):
            self._init_from(cfg.init_from)
        self.loss = VQLoss(LossConfig(**OmegaConf.to_container(cfg.loss, resolve=True)),
                           in_channels=cfg.model.in_channels)
        self.accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
        self.channels_last = resolve_channels_last(cfg.optim.channels_last, cfg.trainer.accelerator)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.register_buffer("val_counts", torch.zeros(cfg.model.num_codes), persistent=False)
        self._oracle: Counter = Counter()

    def _init_from(self, folder: str) -> None:
        init_from(self.vqgan, folder, WEIGHTS_NAME, "VQGAN")
        path = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(path):
            made_with = VQGANConfig.from_dict(read_json(path), source=path)
            self.vqgan.config.check_same_function(made_with, f"init_from {path}")

    # ---- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        betas = tuple(o.betas)
        params = [p for p in self.vqgan.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
        factor = lr_factor(max(0, int(o.warmup_steps)), int(self.cfg.trainer.max_steps), o.decay, o.min_lr_ratio,
                           budget_spent(self))
        sched = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
        optimizers = [opt_g]
        if self.loss.discriminator is not None:
            optimizers.append(torch.optim.Adam(self.loss.discriminator.parameters(), lr=o.disc_lr or o.lr,
                                               betas=betas))
        return optimizers, [{"scheduler": sched, "interval": "step"}]

    def on_fit_start(self) -> None:
        if self.trainer.accumulate_grad_batches != 1:
            raise ConfigError("build the Trainer with accumulate_grad_batches=1; the VQGAN module accumulates "
                              "over cfg.trainer.accumulate_grad_batches itself")
        self.loss.set_max_steps(int(self.trainer.max_steps))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["quantizer_restart"] = self.vqgan.quantize.restart_state()  # rank 0's, like the RNG states
        # the window of recent code indices behind train/codebook_usage and train/perplexity (not in the state dict)
        usage = self.vqgan.quantize.usage
        checkpoint["codebook_usage"] = {"ring": usage.ring.detach().cpu().clone(), "pos": usage.pos}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "quantizer_restart" in checkpoint:  # absent from checkpoints written before it was saved
            self.vqgan.quantize.load_restart_state(checkpoint["quantizer_restart"])
        usage = checkpoint.get("codebook_usage")
        if usage is not None and usage["ring"].shape == self.vqgan.quantize.usage.ring.shape:
            self.vqgan.quantize.usage.ring.copy_(usage["ring"])
            self.vqgan.quantize.usage.pos = int(usage["pos"])

    def _images(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, (list, tuple)) else (opts, None)
        x = self._images(batch)
        step = self.global_step
        gan = self.loss.gan_active(step)
        disc = self.loss.discriminator
        if disc is not None:
            disc.requires_grad_(False)  # the generator's GAN term must not leave gradients on D
        xrec, q = self.vqgan(x)
        g_loss, logs = self.loss.generator_loss(x, xrec, q.loss, self.vqgan.decoder.last_layer, step)
        self.manual_backward(g_loss / self.accumulate)
        logs.update(quant=q.loss.detach(), commitment=q.commitment.detach(), codebook=q.codebook.detach())
        if gan:
            disc.requires_grad_(True)
            d_loss, d_logs = self.loss.discriminator_loss(x, xrec.detach())
            self.manual_backward(d_loss / self.accumulate)
            logs.update(d_logs)
        if (batch_idx + 1) % self.accumulate == 0:
            self.clip_gradients(opt_g, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            self.lr_schedulers().step()
            if gan:
                self.clip_gradients(opt_d, gradient_clip_val=self.cfg.optim.disc_grad_clip,
                                    gradient_clip_algorithm="norm")
                _step_uncounted(opt_d)
            if opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
        self._log_train(logs, opt_g, opt_d)
        return g_loss.detach()

    def _log_train(self, logs: dict[str, torch.Tensor], opt_g: Any, opt_d: Any) -> None:
        out = {f"train/{k}": v.float() for k, v in logs.items()}
        out["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        if opt_d is not None:
            out["train/lr_disc"] = torch.tensor(opt_d.param_groups[0]["lr"])
        stats = self.vqgan.quantize.usage.stats()
        out["train/codebook_usage"] = torch.tensor(stats["usage"])
        out["train/perplexity"] = torch.tensor(stats["perplexity"])
        out["train/gan_active"] = torch.tensor(float(self.loss.gan_active(self.global_step)))
        self.log_dict(out, on_step=True, on_epoch=False, batch_size=1)
        self.log("train/loss", logs["total"].float(), on_step=True, prog_bar=True, batch_size=1)
        self.log("train/usage", out["train/codebook_usage"], on_step=True, prog_bar=True, batch_size=1)

    # ---- validation ---------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()
        self._oracle = Counter()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._images(batch)
        xrec, q = self.vqgan(x)
        xrec = xrec.float().clamp(-1, 1)
        x = x.float()
        x01, r01 = (x + 1) / 2, (xrec + 1) / 2
        self.val_psnr.update(r01, x01)
        self.val_ssim.update(r01, x01)
        self.val_counts += torch.bincount(q.indices.flatten(), minlength=self.val_counts.numel()).float()
        self.log("val/rec", self.loss.pixel(x, xrec), sync_dist=True, batch_size=x.shape[0])
        if self.loss.perceptual is not None:
            self.log("val/lpips", self.loss.perceptual(x, xrec).mean(), sync_dist=True, batch_size=x.shape[0])
        if self.cfg.get("eval", {}).get("shapes_oracle", False):
            from data.oracle import score

            for caption, image in zip(batch["caption"], xrec.cpu()):
                self._oracle.update({k: int(v) for k, v in score(caption, image).items()})
            self._oracle["n"] += x.shape[0]
        if batch_idx == 0:
            n = min(self.cfg.optim.val_grid_images, x.shape[0])
            log_image_grid(self, "val/reconstructions", torch.cat([x[:n], xrec[:n]]), nrow=n)

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self.val_counts.clone(), reduce_op="sum")
        total = counts.sum().clamp_min(1)
        p = counts / total
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        self.log_dict({"val/psnr": self.val_psnr.compute(), "val/ssim": self.val_ssim.compute(),
                       "val/codebook_usage": (counts > 0).float().mean(), "val/perplexity": perplexity},
                      sync_dist=False)
        self.val_psnr.reset()
        self.val_ssim.reset()
        if self._oracle["n"]:
            keys = sorted(k for k in self._oracle if k != "n")
            t = self.trainer.strategy.reduce(torch.tensor([float(self._oracle[k]) for k in keys + ["n"]],
                                                          device=self.device), reduce_op="sum")
            self.log_dict({f"val/oracle_{k}": t[i] / t[-1] for i, k in enumerate(keys)}, sync_dist=False)

    def export(self, out_dir: str) -> None:
        self.vqgan.save_pretrained(out_dir)


def build(cfg: DictConfig) -> VQGANModule:
    return VQGANModule(cfg)


def check_run_config(cfg: DictConfig) -> None:
    """At start-up: optim.channels_last is true, false or auto."""
    try:
        resolve_channels_last(cfg.optim.channels_last, cfg.trainer.accelerator)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


COMPONENT = Component(
    name="vqgan", schema=VQGANRunConfig, build=build, data_mode="images", manual_optimization=True,
    fsdp_unsupported="the GAN steps two optimizers by hand and its discriminator uses BatchNorm, which sharding "
    "does not cover; use trainer.strategy=ddp (VQGANs are small enough to replicate on every GPU: f16-16384 has "
    "76M parameters)", check=check_run_config)

"""Training the prior on code shards: ``python train.py bart_prior --config configs/bart_prior/NAME.yaml``.

Teacher forcing with decoder input = start token + codes[:-1] and mean cross-entropy over the h*w image positions;
captions are blanked with probability ``train.caption_dropout`` so the same network also learns the unconditional
distribution that guided sampling subtracts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bart_prior.model import PriorConfig, resolve_text_encoder
from bart_prior.prior import TOKENIZER_DIR, WEIGHTS_NAME, BartPrior
from bart_prior.shards import check_batch, check_code_shards
from bart_prior.tokenizer import load_tokenizer
from core.files import init_from
from launch.components import Component
from launch.config import ConfigError, RunConfig
from launch.schedule import budget_spent, lr_factor
from launch.sharding import ShardedModule

log = logging.getLogger(__name__)


@dataclass
class TokenizerSection:
    path: str = ""  # a tokenizer folder (python -m bart_prior.tokenizer train ..., or a saved BART tokenizer)
    min_vocab: int = 261  # fewer tokens means a wrong/empty folder (256 bytes + 5 specials)


@dataclass
class PriorOptimConfig:
    name: str = "adamw"  # adamw | adafactor
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.01  # AdamW only; not applied to biases, norms and embeddings
    warmup_steps: int = 200
    decay: str = "cosine"  # cosine | linear | constant (after warmup), down to lr * min_lr_ratio at max_steps
    #   (or at the end of trainer.max_time when that ends the run first: launch/schedule.py)
    min_lr_ratio: float = 0.1
    # the text encoder's LR = lr * encoder_lr_scale. The encoder learns from a weak signal (the caption settles the
    # first codes and the shape; the previous codes predict the rest), and at a high LR it can collapse to the same
    # output for every caption (docs/bart_prior.md, "A prior that ignores its captions").
    encoder_lr_scale: float = 1.0


@dataclass
class PriorTrainConfig:
    caption_dropout: float = 0.1
    sample_every_n_validations: int = 1  # image grids need model.vqgan_for_samples; 0 = never
    sample_prompts: list[str] = field(default_factory=list)  # default: the first captions of the validation set
    sample_num_prompts: int = 8
    sample_candidates: int = 4
    sample_condition_scale: float = 1.0
    sample_top_k: Optional[int] = None
    sample_seed: int = 0


@dataclass
class PriorRunConfig(RunConfig):
    model: PriorConfig = field(default_factory=PriorConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optim: PriorOptimConfig = field(default_factory=PriorOptimConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


def build_prior(cfg: DictConfig) -> BartPrior:
    """The prior a run starts from: the configured architecture, fresh (optionally with a pretrained text encoder)
    or with the weights of an ``init_from`` folder. The tokenizer is ``tokenizer.path``, else the ``init_from``
    folder's own."""
    tok_path = cfg.tokenizer.path or (os.path.join(cfg.init_from, TOKENIZER_DIR) if cfg.init_from else "")
    if not tok_path:
        raise ConfigError("tokenizer.path is empty: train one with `python -m bart_prior.tokenizer train "
                          "--input PATTERN --vocab-size N --out DIR` and pass tokenizer.path=DIR")
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from: no folder {cfg.init_from} (a BartPrior export, e.g. runs/NAME/export)")
    tok = load_tokenizer(tok_path, min_vocab=cfg.tokenizer.min_vocab)
    model_cfg = resolve_text_encoder(PriorConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    if model_cfg.text_vocab_size is None:
        model_cfg.text_vocab_size = len(tok)
    prior = BartPrior(model_cfg, tok)
    if cfg.init_from:
        init_from(prior.model, cfg.init_from, WEIGHTS_NAME, "BartPrior")
    return prior


class PriorModule(ShardedModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.save_hyperparameters(OmegaConf.to_container(cfg, resolve=True))
        self.cfg = cfg
        self.prior = build_prior(cfg)
        self._validations = 0
        self._checked = {"train": False, "val": False}
        self._val_prompts: list[str] = []
        self._val_sum, self._val_count = torch.zeros(()), 0

    @property
    def model(self):
        return self.prior.model

    # ---- start-up checks
    def setup(self, stage: str) -> None:
        c = self.prior.config
        for split in ("train", "val") if stage == "fit" else ("val",):
            pattern = self.cfg.data.get(split)
            if pattern:
                check_code_shards(pattern, c.codebook_size, c.grid)
        if self.cfg.model.vqgan_for_samples and self.cfg.train.sample_every_n_validations > 0:
            self._vqgan()  # a missing or mismatched VQGAN fails now, not after the first validation

    def _vqgan(self):
        if getattr(self, "_vqgan_model", None) is None:
            from vqgan import VQGAN  # only when image grids are asked for

            vq = VQGAN.from_pretrained(self.cfg.model.vqgan_for_samples).eval()
            c = self.prior.config
            size = getattr(vq, "codebook_size", None) or vq.config.num_codes
            grid = getattr(vq, "grid", None) or (vq.config.token_grid, vq.config.token_grid)
            if size != c.codebook_size or tuple(grid) != tuple(c.grid):
                raise ConfigError(f"model.vqgan_for_samples has {size} codes on a {tuple(grid)} grid; the prior "
                                  f"predicts {c.codebook_size} codes on {tuple(c.grid)}")
            object.__setattr__(self, "_vqgan_model", vq)  # not a submodule: not trained, not checkpointed
        return self._vqgan_model

    # ---- steps
    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.prior.encode_prompts(captions, warn=False)
        return ids.to(self.device), mask.to(self.device)

    def _loss(self, batch: dict[str, Any], split: str, captions: list[str]):
        codes = batch["codes"]
        if not self._checked[split]:
            check_batch(codes, self.prior.config.codebook_size, self.prior.config.grid)
            self._checked[split] = True
        target = codes.reshape(codes.shape[0], -1).long()
        ids, mask = self._text(captions)
        logits = self.model(ids, mask, self.model.decoder_inputs(target))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = list(batch["caption"])
        p = self.cfg.train.caption_dropout
        if p > 0:
            drop = (torch.rand(len(captions)) < p).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        loss, acc = self._loss(batch, "train", captions)
        bs = len(captions)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/perplexity", torch.exp(loss.detach()), batch_size=bs)
        self.log("train/token_accuracy", acc, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self._trainer else 0.0,
                 batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        captions = list(batch["caption"])
        if len(self._val_prompts) < self.cfg.train.sample_num_prompts:
            self._val_prompts += captions[: self.cfg.train.sample_num_prompts - len(self._val_prompts)]
        loss, acc = self._loss(batch, "val", captions)
        bs = len(captions)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/token_accuracy", acc, sync_dist=True, batch_size=bs)
        # How much the caption lowers the loss (nats per code): the mean loss hides it, since the previous codes
        # predict most of the next one; near 0 means the prior ignores its captions and draws unconditional images.
        empty, _ = self._loss(batch, "val", [""] * bs)
        self.log("val/caption_gain", empty - loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self._val_sum += loss.detach().float() * bs
        self._val_count += bs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["prior_validations"] = self._validations  # image samples every n validations, counted on resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._validations = int(checkpoint.get("prior_validations", self._validations))

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = torch.zeros((), device=self.device), 0

    def on_validation_epoch_end(self) -> None:
        if self._val_count:  # exp of the mean loss, not the mean of per-batch perplexities
            self.log("val/perplexity", torch.exp(self._val_sum / self._val_count), sync_dist=True)
        self._validations += 1
        n = self.cfg.train.sample_every_n_validations
        due = n > 0 and self._validations % n == 0 and not self.trainer.sanity_checking
        if due and self.cfg.model.vqgan_for_samples:
            self.log_samples()

    def log_samples(self) -> Optional[str]:
        """Sample the fixed prompts and log the decoded images (one row of candidates per prompt)."""
        from launch.images import log_image_grid

        from pytorch_lightning.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # the cached sampler calls layers' projections directly, which sharded parameters do not allow
            log.warning("image samples are not drawn under FSDP; sample the exported prior instead")
            return None
        t = self.cfg.train
        prompts = list(t.sample_prompts) or self._val_prompts[: t.sample_num_prompts]
        if not prompts:
            return None
        codes = self.prior.generate(prompts, t.sample_candidates, condition_scale=t.sample_condition_scale,
                                    top_k=t.sample_top_k, seed=t.sample_seed)
        h, w = self.prior.config.grid
        vq = self._vqgan().to(self.device)
        with torch.inference_mode():
            images = vq.decode(codes.view(-1, h, w).to(self.device)).float()
        return log_image_grid(self, "val/samples", images, nrow=t.sample_candidates)

    # ---- optimisation
    def configure_optimizers(self):
        o = self.cfg.optim
        if o.encoder_lr_scale <= 0:
            raise ConfigError(f"optim.encoder_lr_scale must be > 0, got {o.encoder_lr_scale}")
        groups: dict[tuple[bool, bool], list] = {(e, d): [] for e in (False, True) for d in (True, False)}
        for name, p in self.named_parameters():
            encoder = name.startswith("prior.model.encoder.")
            groups[(encoder, p.ndim >= 2 and "embed" not in name)].append(p)
        # group 0 is the decoder's decayed weights: train/lr logs its rate
        params = [{"params": ps, "lr": o.lr * (o.encoder_lr_scale if encoder else 1.0),
                   "weight_decay": o.weight_decay if decayed else 0.0}
                  for (encoder, decayed), ps in groups.items() if ps]
        if o.name == "adamw":
            opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        elif o.name == "adafactor":
            check_run_config(self.cfg)
            from transformers.optimization import Adafactor

            for group in params:
                group.pop("weight_decay")
            opt = Adafactor(params, lr=o.lr, scale_parameter=False, relative_step=False, warmup_init=False)
        else:
            raise ConfigError(f"optim.name must be adamw or adafactor, got '{o.name}'")
        total = max(1, int(self.cfg.trainer.max_steps))
        factor = lr_factor(o.warmup_steps, total, o.decay, o.min_lr_ratio, budget_spent(self))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, out_dir: str) -> None:
        self.prior.save_pretrained(out_dir)

    def fsdp_root(self) -> torch.nn.Module:
        return self.model

    def fsdp_blocks(self) -> list[torch.nn.Module]:
        return [*self.model.encoder.layers, *self.model.decoder.layers]


def check_run_config(cfg: DictConfig) -> None:
    """Settings the prior cannot run together, refused at start-up."""
    if cfg.optim.name == "adafactor" and cfg.trainer.strategy == "fsdp":
        # its factored second moments reduce over whole rows and columns, which neither transformers' nor torch's
        # Adafactor can do on FSDP2's sharded parameters (they fail inside DTensor dispatch)
        raise ConfigError("optim.name=adafactor does not work with trainer.strategy=fsdp: use adamw, or adafactor "
                          "with trainer.strategy=ddp")


COMPONENT = Component(name="bart_prior", schema=PriorRunConfig, build=lambda cfg: PriorModule(cfg), data_mode="codes",
                      check=check_run_config)

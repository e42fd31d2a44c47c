"""One training run of one component: config -> run folder -> Trainer.fit -> export."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from launch.components import get_component
from launch.config import ConfigError, load_config
from core.hardware import check_attention
from launch.requeue import SlurmRequeue
from launch.run import RunDir, prepare_run
from launch.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run: RunDir
    export_dir: Optional[str]  # None when the run stopped to be requeued
    resumed_from: Optional[str]
    trainer: pl.Trainer


def resolve_config(component: str, config_path: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    comp = get_component(component)
    cfg = load_config(comp.schema, config_path, overrides)
    if cfg.data.mode != comp.data_mode:
        raise ConfigError(f"{config_path}: data.mode is '{cfg.data.mode}' but {component} reads '{comp.data_mode}'")
    if cfg.trainer.strategy == "fsdp" and comp.fsdp_unsupported:
        raise ConfigError(f"trainer.strategy=fsdp is not supported for {component}: {comp.fsdp_unsupported}")
    try:
        check_attention(cfg.trainer.attention)
    except ValueError as e:  # before the run folder exists
        raise ConfigError(str(e)) from None
    return cfg


def run_training(component: str, config_path: Optional[str], overrides: Sequence[str] = ()) -> RunResult:
    """Train ``component`` as configured; resumes from the run folder's last checkpoint when ``resume: auto``."""
    # imported here so that config errors surface before the heavier imports
    from data.datamodule import ShardDataModule

    comp = get_component(component)
    cfg = resolve_config(component, config_path, overrides)
    run, ckpt = prepare_run(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True)
    trainer = build_trainer(cfg, run, manual_optimization=comp.manual_optimization)
    if trainer.is_global_zero:
        run.write_config(cfg)
        if ckpt:
            log.info("resuming from %s", ckpt)
    datamodule = ShardDataModule(cfg.data)
    module = comp.build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if any(isinstance(cb, SlurmRequeue) and cb.requeued for cb in trainer.callbacks):
        return RunResult(run=run, export_dir=None, resumed_from=ckpt, trainer=trainer)
    export(module, trainer, run.export, rebuild=lambda: comp.build(cfg))
    return RunResult(run=run, export_dir=run.export, resumed_from=ckpt, trainer=trainer)


def export(module: pl.LightningModule, trainer: pl.Trainer, out_dir: str,
           rebuild: Optional[Callable[[], pl.LightningModule]] = None) -> None:
    """Every rank calls this; rank 0 writes the save_pretrained folder.

    A sharded (FSDP2) model is first gathered into a full state dict (collectively), loaded into an unsharded copy
    built by ``rebuild``, and exported from there: the export has the same single-file format either way.
    """
    from pytorch_lightning.strategies import ModelParallelStrategy

    if isinstance(trainer.strategy, ModelParallelStrategy):
        from launch.sharding import full_state_dict, match_shapes

        state = full_state_dict(module)
        if trainer.is_global_zero:
            plain = rebuild()
            plain.load_state_dict(match_shapes(state, plain))
            plain.export(out_dir)
    elif trainer.is_global_zero:
        module.export(out_dir)
    trainer.strategy.barrier("export")
    if trainer.is_global_zero:
        log.info("exported %s", os.path.abspath(out_dir))

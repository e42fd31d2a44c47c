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
from launch.config import ConfigError, check_values, load_config
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


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    return (devices if isinstance(devices, int) else 1) * int(cfg.trainer.num_nodes)


def resolve_config(component: str, config_path: Optional[str], overrides: Sequence[str] = (),
                   check_files: bool = True) -> DictConfig:
    """The run config of ``component``, checked before anything is built or written: keys and types (load_config),
    value ranges (launch.config.check_values) and, with ``check_files``, that the data settings name shards that
    hold at least one batch (data.config.check_data). Every problem is a one-line ConfigError / DataError."""
    from data.config import check_data

    comp = get_component(component)
    cfg = load_config(comp.schema, config_path, overrides)
    check_values(cfg)
    if cfg.data.mode != comp.data_mode:
        raise ConfigError(f"{config_path}: data.mode is '{cfg.data.mode}' but {component} reads '{comp.data_mode}'")
    if cfg.trainer.strategy == "fsdp" and comp.fsdp_unsupported:
        raise ConfigError(f"trainer.strategy=fsdp is not supported for {component}: {comp.fsdp_unsupported}")
    if comp.check:
        comp.check(cfg)
    try:
        check_attention(cfg.trainer.attention)
    except ValueError as e:  # before the run folder exists
        raise ConfigError(str(e)) from None
    if check_files:
        check_data(cfg.data, world_size=_world_size(cfg))
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
    datamodule = ShardDataModule(cfg.data, **_codes_spec(cfg))
    module = comp.build(cfg)
    # weights_only: a checkpoint is read as tensors and plain containers, never as pickled code; a sharded (FSDP)
    # checkpoint folder is read by torch.distributed.checkpoint, which unpickles its .metadata (trusted: this run
    # wrote it)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    if any(isinstance(cb, SlurmRequeue) and cb.requeued for cb in trainer.callbacks):
        return RunResult(run=run, export_dir=None, resumed_from=ckpt, trainer=trainer)
    export(module, trainer, run.export, rebuild=lambda: comp.build(cfg))
    return RunResult(run=run, export_dir=run.export, resumed_from=ckpt, trainer=trainer)


def _codes_spec(cfg: DictConfig) -> dict:
    """For a stage that reads code shards: the codebook size and token grid its model predicts (``model.codebook_size``
    and ``model.grid``), so that a code sample that does not fit is skipped and counted instead of reaching the
    model."""
    model = cfg.get("model")
    if cfg.data.mode != "codes" or model is None or "codebook_size" not in model or "grid" not in model:
        return {}
    return {"codebook_size": int(model.codebook_size), "grid": tuple(int(g) for g in model.grid)}


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

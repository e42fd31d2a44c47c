"""pl.Trainer construction from the ``trainer:`` config section: strategy, loggers, checkpoints, progress."""
from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_info

from core.files import atomic_file
from launch.config import ConfigError
from core.hardware import attention_backends, resolve_trainer_precision
from launch.requeue import SlurmRequeue, in_slurm_job
from launch.run import RunDir
from launch.schedule import TimeBudget


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through core.files.atomic_file, so a killed job never leaves a half-written checkpoint under the
    real name."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        with atomic_file(str(path), "wb") as fh:
            torch.save(checkpoint, fh)


class _KeepingWriter(ExperimentWriter):
    """Appends to an existing metrics.csv: Lightning's writer deletes it when the folder exists, so a resumed run
    would lose the history of everything before the resume."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])

    def drop_from(self, step: int) -> None:
        """Forget rows logged at ``step`` or later (a killed run logs past its last checkpoint; the resumed run logs
        those steps again)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if not r.get("step") or int(r["step"]) < step]
        with atomic_file(self.metrics_file_path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """``csv/metrics.csv`` that survives resumes: old rows up to the resumed step stay, new ones are appended."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class _TrimLogsOnResume(Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger) and trainer.is_global_zero:
                # the step loggers write: batches that stepped an optimizer (restored with the checkpoint)
                logger.experiment.drop_from(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped",
                                                    trainer.global_step))


class RNGStateCheckpoint(Callback):
    """Saves the process RNG states (python, numpy, torch CPU and CUDA) in checkpoints and restores them on resume,
    which Lightning does not do by itself: dropout, caption dropout and sampling continue as if never stopped."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = _collect_rng_states()
        kind, keys, pos, has_gauss, cached = states.pop("numpy")
        # numpy's key array as a tensor, so checkpoints still load with torch.load(weights_only=True)
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            states = dict(checkpoint["rng_states"])
            kind, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
            _set_rng_states(states)


class AttentionKernels(Callback):
    """Restricts ``F.scaled_dot_product_attention`` to ``backends`` from setup to teardown of a fit (the flags are
    process-wide; teardown restores torch's own choice for whatever runs after the Trainer)."""

    def __init__(self, backends: list[SDPBackend]) -> None:
        self.backends = backends
        self._stack: Optional[contextlib.ExitStack] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(sdpa_kernel(self.backends))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def _accelerator(tc: DictConfig) -> str:
    if tc.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return tc.accelerator


def build_strategy(tc: DictConfig, find_unused_parameters: bool = False) -> Any:
    """'auto' | 'ddp' | 'fsdp' -> a Lightning strategy object (gloo on CPU, NCCL on GPU).

    ``find_unused_parameters``: DDP must expect backward passes that leave parameters untouched (a GAN's generator
    and discriminator losses each reach only part of the module, and the discriminator none before it starts)."""
    accelerator = _accelerator(tc)
    if tc.strategy == "auto":
        return "auto"
    if tc.strategy == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo",
                           checkpoint_io=AtomicCheckpointIO(), find_unused_parameters=find_unused_parameters)
    if tc.strategy == "fsdp":
        from pytorch_lightning.strategies import ModelParallelStrategy

        devices = tc.devices if isinstance(tc.devices, int) else (torch.cuda.device_count() or 1)
        # An explicit data-parallel mesh: the default mesh of ModelParallelStrategy does not shard parameters.
        return ModelParallelStrategy(data_parallel_size=devices * tc.num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=True)
    raise ConfigError(f"trainer.strategy must be auto, ddp or fsdp, got '{tc.strategy}'")


def _drop_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\U0001f4a1 Tip")


def _quiet_lightning() -> None:
    """Keep Lightning's advice that does not apply to our runs out of their logs (each line says why it does not)."""
    # Lightning warns about every IterableDataset with a length; ours has one only with data.resampled, where each
    # loader worker stops at exactly its share of the epoch (data/datamodule.py, _EpochLimit), so it is exact.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    # With manual optimization Lightning asks for the weights from before the step; ours resume after it, with the
    # optimizer and step counter of that same moment, which is what makes a resumed run end where an unbroken one does.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # Lightning 2.6 on torch 2.14 trips torch's own deprecation on every fit; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning advertises its cloud logger on every start.
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _drop_tips not in logger.filters:
        logger.addFilter(_drop_tips)


def build_trainer(cfg: DictConfig, run: RunDir, callbacks: list | None = None,
                  manual_optimization: bool = False) -> pl.Trainer:
    """``manual_optimization``: the module accumulates and clips itself, so the Trainer gets neither setting."""
    tc = cfg.trainer
    _quiet_lightning()
    strategy = build_strategy(tc, find_unused_parameters=manual_optimization)
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints, filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=tc.checkpoint_every_n_steps, save_last=True,
        monitor="step", mode="max", save_top_k=tc.keep_checkpoints,
    )
    cbs: list = [checkpoint, RNGStateCheckpoint(), LearningRateMonitor(logging_interval="step"), _TrimLogsOnResume()]
    if tc.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, tc.log_every_n_steps)))
    if tc.max_time:
        cbs.append(TimeBudget())  # the schedules anneal by the time budget when it ends the run first
    cbs += callbacks or []
    loggers = [TensorBoardLogger(save_dir=run.root, name="tb", version="", default_hp_metric=False),
               # written at every log step (an append), so a killed run loses no more than its last row
               ResumableCSVLogger(save_dir=run.root, name="csv", version="",
                                  flush_logs_every_n_steps=tc.log_every_n_steps)]
    plugins: list = [AtomicCheckpointIO()] if strategy == "auto" else []
    precision = resolve_trainer_precision(tc.precision, _accelerator(tc))
    if precision != tc.precision:
        rank_zero_info(f"trainer.precision: {tc.precision} -> {precision} (core/hardware.py)")
    try:
        backends = attention_backends(tc.attention, _accelerator(tc), precision)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if backends:
        cbs.append(AttentionKernels(backends))
    if in_slurm_job():
        # Lightning's own SIGUSR1 handler saves inside the handler, which can deadlock DDP (see launch/requeue.py)
        from lightning_fabric.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
        cbs.append(SlurmRequeue())
    return pl.Trainer(
        accelerator=_accelerator(tc), devices=tc.devices, num_nodes=tc.num_nodes, strategy=strategy,
        precision=precision, max_steps=tc.max_steps, max_epochs=-1, max_time=tc.max_time,
        val_check_interval=tc.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=tc.limit_val_batches, log_every_n_steps=tc.log_every_n_steps,
        accumulate_grad_batches=1 if manual_optimization else tc.accumulate_grad_batches,
        gradient_clip_val=None if manual_optimization else tc.gradient_clip_val,
        num_sanity_val_steps=tc.num_sanity_val_steps, deterministic=tc.deterministic,
        enable_progress_bar=tc.progress_bar, default_root_dir=run.root, callbacks=cbs, logger=loggers,
        plugins=plugins or None, use_distributed_sampler=False,
    )

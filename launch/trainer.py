"""pl.Trainer construction from the ``trainer:`` config section: strategy, loggers, checkpoints, progress."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import random
import warnings
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from core.files import append_text, atomic_file, atomic_path, commit_folder, read_complete_lines, staging_folder
from launch.config import ConfigError
from core.hardware import attention_backends, resolve_trainer_precision
from launch.requeue import SlurmRequeue, in_slurm_job
from launch.run import RunDir
from launch.schedule import TimeBudget


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving every ``every_n_train_steps`` optimizer steps and nowhere else.

    Two of its behaviours would break that: at the last batch of an epoch it puts a monitored save off until the
    next validation ends (which ``trainer.val_check_interval`` may place many steps later), so the checkpoint of an
    epoch's end was skipped (``save_on_train_epoch_end=True`` turns that off; with step-based saving it saves nothing
    at an epoch's end itself); and a resumed run does not know the step its checkpoint was saved at, so with
    gradient accumulation it saved again at that step, half-way through the next accumulation group (whose
    gradients a checkpoint does not hold)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(save_on_train_epoch_end=True, **kwargs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # 0 in a new run, as Lightning starts it


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through core.files.atomic_file, so a killed job never leaves a half-written checkpoint under the
    real name."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        with atomic_file(str(path), "wb") as fh:
            torch.save(checkpoint, fh)


class _KeepingWriter(ExperimentWriter):
    """csv/metrics.csv that survives crashes and resumes. Lightning's writer deletes the file when the folder exists
    (a resumed run would lose the history before the resume) and rewrites it in place when a new column appears (a
    crash then loses it all). Here the file is replaced through core.files.atomic_file when it is created or gets a
    new column, new rows are appended whole (core.files.append_text: a crash can only tear the last line, which
    every read here leaves out), and hparams.yaml is replaced atomically."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = list(csv.DictReader(io.StringIO(read_complete_lines(self.metrics_file_path)))
                                     .fieldnames or [])

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def _rows(self) -> list[dict[str, str]]:
        """The rows on disk, without a torn last line or a row whose step does not read."""
        if not os.path.isfile(self.metrics_file_path):
            return []
        rows = csv.DictReader(io.StringIO(read_complete_lines(self.metrics_file_path)))
        return [r for r in rows if (r.get("step") or "").isdigit()]

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        with atomic_file(self.metrics_file_path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        if new_keys or not os.path.isfile(self.metrics_file_path):
            self._rewrite(self._rows() + self.metrics)
        else:
            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=self.metrics_keys).writerows(self.metrics)
            append_text(self.metrics_file_path, buf.getvalue())
        self.metrics = []

    def resume_at(self, step: int, row: Optional[dict[str, Any]] = None) -> None:
        """Forget rows logged at ``step`` or later (a killed run logs past its last checkpoint; the resumed run logs
        those steps again), and settle the row of the step the checkpoint was taken at (``row``, saved in the
        checkpoint by :class:`ResumableLogs`): written when the killed run died before writing it, removed when the
        killed run logged it only because it stopped there (a requeue) and an uninterrupted run would not."""
        self.save()
        rows = [r for r in self._rows() if int(r["step"]) < step]
        if row is not None:
            at, keys = int(row["step"]), set(row["keys"])
            has = [i for i, r in enumerate(rows) if int(r["step"]) == at and any(r.get(k) for k in keys)]
            if not row["due"]:
                rows = [r for i, r in enumerate(rows) if i not in has]
            elif not has:
                rows.append({**row["metrics"], "epoch": row["epoch"], "step": at})
                self.metrics_keys = sorted(set(self.metrics_keys) | set(row["metrics"]) | {"epoch", "step"})
        if rows or os.path.isfile(self.metrics_file_path):
            self._rewrite(rows)


class ResumableCSVLogger(CSVLogger):
    """``csv/metrics.csv`` that survives resumes: old rows up to the resumed step stay, new ones are appended."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class AtomicTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger with its hparams.yaml written atomically: Lightning writes it in place, once,
    when it is missing, so a crash mid-write left a partial one for good. (The event files only grow: TensorBoard
    reads up to a torn last record.)"""

    @rank_zero_only
    def save(self) -> None:
        super(TensorBoardLogger, self).save()  # what TensorBoardLogger.save does before its hparams.yaml
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        if os.path.isdir(self.log_dir) and not os.path.isfile(path):
            with atomic_path(path) as tmp:
                save_hparams_to_yaml(tmp, self.hparams)


def _logged_step(trainer: pl.Trainer) -> int:
    """The step the loggers write the current training batch's row at (Lightning's own counter)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


class ResumableLogs(Callback):
    """Makes csv/metrics.csv of a resumed run equal to an uninterrupted run's.

    Lightning writes a step's row after the step's ``on_train_batch_end`` hooks, where checkpoints are saved: a run
    killed right after a checkpoint loses that row. So the checkpoint carries it (``log_position``): the step the
    resumed run logs first, and the row of the checkpoint's own step with whether an uninterrupted run logs it there
    (a requeue stop logs a row at any step). On resume the CSV log drops what the killed run logged past the
    checkpoint and settles that row (:meth:`_KeepingWriter.resume_at`)."""

    def __init__(self) -> None:
        self._in_batch_end = False
        self._position: Optional[dict[str, Any]] = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._in_batch_end = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._in_batch_end = True  # callbacks run in order, checkpoint callbacks last: they save after this

    def on_validation_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._in_batch_end = False

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._in_batch_end = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        step = _logged_step(trainer)
        if not self._in_batch_end:
            checkpoint["log_position"] = {"next_step": step, "row": None}
            return
        metrics = convert_tensors_to_scalars(trainer._logger_connector.metrics["log"])
        due = trainer.log_every_n_steps > 0 and (step + 1) % trainer.log_every_n_steps == 0
        checkpoint["log_position"] = {
            "next_step": step + 1,
            "row": {"step": step, "epoch": trainer.current_epoch, "due": due, "keys": sorted(metrics),
                    "metrics": dict(metrics)}}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._position = checkpoint.get("log_position")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        position, self._position = self._position, None
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                if position is None:  # a fresh run, or a checkpoint written before log positions were saved
                    logger.experiment.resume_at(_logged_step(trainer))
                else:
                    logger.experiment.resume_at(int(position["next_step"]), position["row"])


class EpochStartCounters(Callback):
    """A run resumed from the last batch of an epoch starts the next epoch, but when the loader has no length
    (``data.resampled: false``) Lightning keeps counting its batches in the epoch from the previous one: batch
    indices and gradient-accumulation groups of that epoch would be shifted. Here the counters are set back (at
    ``on_train_start``, before the epoch loop reads them) so that the epoch counts from 0, as an uninterrupted run's
    does. The data module says when (its position is at the start of the current epoch)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        position = getattr(trainer.datamodule, "position", None)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if (isinstance(position, dict) and position.get("epoch") == trainer.current_epoch
                and position.get("batches") == 0 and trainer.fit_loop.epoch_loop.restarting and progress.ready > 0):
            # the epoch loop's reset then adds the checkpoint's unfinished batch (completed + 1) and starts from it
            progress.ready = progress.started = progress.processed = 0
            progress.completed = -1


class StepSeed(Callback):
    """Seeds python's, numpy's and torch's (CPU and CUDA) global generators before every training batch from (run
    seed, rank, epoch, batch number in the epoch), as fairseq seeds each update. Whatever a training step draws from
    them (dropout, the prior's caption dropout, CLIP's choice of images to reconstruct) is then a function of where
    the run is, not of what drew before (a data loader starting, a validation, the resume itself): a resumed run
    draws what the uninterrupted one draws. The batch number is the data module's (restored exactly); Lightning's
    ``batch_idx`` goes on counting from the previous epoch when a run resumes from an epoch's last batch and the
    loader has no length."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        position = getattr(trainer.datamodule, "position", None)
        if isinstance(position, dict) and position.get("epoch") == trainer.current_epoch:
            batch_idx = int(position["batches"]) - 1  # counted when the batch was handed over, from 1
        seed = int.from_bytes(hashlib.blake2b(f"{self.seed}/{trainer.global_rank}/{trainer.current_epoch}/"
                                              f"{batch_idx}".encode(), digest_size=8).digest(), "little")
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)  # every CUDA device too


class RNGStateCheckpoint(Callback):
    """Saves the process RNG states (python, numpy, torch CPU and CUDA) in checkpoints and restores them on resume,
    which Lightning does not do by itself. Training steps do not depend on them (:class:`StepSeed` reseeds before
    every batch); this covers what draws outside the steps."""

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


def _atomic_model_parallel(base: type) -> type:
    """ModelParallelStrategy whose sharded checkpoints (a folder every rank writes into) are written into a staging
    folder and put in place by rank 0 in one step (core.files.staging_folder / commit_folder): Lightning writes into
    the destination itself, so a job killed mid-save left a folder mixing two checkpoints under the real name."""

    class AtomicModelParallelStrategy(base):
        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
            if not self._save_distributed_checkpoint:
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            path = os.path.abspath(str(self.broadcast(str(filepath))))
            tmp = self.broadcast(staging_folder(path) if self.global_rank == 0 else None)
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("sharded checkpoint written")
            if self.global_rank == 0:
                commit_folder(tmp, path)
            self.barrier("sharded checkpoint in place")

    return AtomicModelParallelStrategy


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
        return _atomic_model_parallel(ModelParallelStrategy)(data_parallel_size=devices * tc.num_nodes,
                                                             tensor_parallel_size=1, save_distributed_checkpoint=True)
    raise ConfigError(f"trainer.strategy must be auto, ddp or fsdp, got '{tc.strategy}'")


def _drop_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\U0001f4a1 Tip")


def _quiet_lightning() -> None:
    """Keep Lightning's advice that does not apply to our runs out of their logs (each line says why it does not)."""
    # Lightning warns about every IterableDataset with a length; ours has one only with data.resampled, where each
    # loader worker stops at exactly its share of the epoch (data/stages.py, EpochLimit), so it is exact.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    # With manual optimization Lightning asks for the weights from before the step; ours resume after it, with the
    # optimizer and step counter of that same moment, which is what makes a resumed run end where an unbroken one does.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # The data module saves and restores its loaders' position (data/datamodule.py); Lightning only looks for a
    # state_dict on the loader itself and warns about every resume from the middle of an epoch.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
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
    checkpoint = StepCheckpoint(
        dirpath=run.checkpoints, filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=tc.checkpoint_every_n_steps, save_last=True,
        monitor="step", mode="max", save_top_k=tc.keep_checkpoints,
    )
    cbs: list = [checkpoint, RNGStateCheckpoint(), LearningRateMonitor(logging_interval="step"), ResumableLogs(),
                 StepSeed(cfg.seed), EpochStartCounters()]
    if tc.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, tc.log_every_n_steps)))
    if tc.max_time:
        cbs.append(TimeBudget())  # the schedules anneal by the time budget when it ends the run first
    cbs += callbacks or []
    loggers = [AtomicTensorBoardLogger(save_dir=run.root, name="tb", version="", default_hp_metric=False),
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

"""Checkpoint-and-requeue on SLURM's warning signal, agreed on by all ranks at a step boundary.

Lightning's own handler saves the checkpoint inside the signal handler. Under DDP that save is a collective (a
barrier and, for sharded models, gathers), and each rank runs its handler whenever the signal reaches it: one rank can
enter the barrier while the other is still blocked in a gradient all-reduce, and the job hangs until SLURM kills it
without a checkpoint. Here the handler only raises a flag; at the end of every training batch the ranks all-reduce the
flag, so they save together, the first rank runs ``scontrol requeue``, and training stops without exporting.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import signal
import subprocess
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    """A batch job step (srun inside sbatch); not an interactive allocation, where requeueing makes no sense."""
    return SLURMEnvironment.detect()


def next_hpc_checkpoint(root: str) -> str:
    """``hpc_ckpt_N.ckpt`` with N one above the highest present, the name ``resume: auto`` looks for."""
    numbers = [int(m.group(1)) for p in glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt"))
               if (m := re.search(r"hpc_ckpt_(\d+)\.ckpt$", p))]
    return os.path.join(root, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue_job() -> bool:
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("requeue requested but SLURM_JOB_ID is not set")
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("requeue of job %s failed: scontrol not found", job)
        return False
    if out.returncode != 0:
        log.warning("requeue of job %s failed: %s", job, out.stderr.strip() or out.returncode)
        return False
    log.info("requeued SLURM job %s", job)
    return True


class SlurmRequeue(Callback):
    """On ``signum`` (SIGUSR1, what the sbatch script asks SLURM to send before the time limit): save
    ``hpc_ckpt_N.ckpt`` in the run folder, requeue the job, stop training. ``requeued`` tells the caller to skip
    the export. If the requeue fails the checkpoint stays and training goes on until the job is killed."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False
        self.requeued = False
        self._previous: Optional[Any] = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is None:
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # one tiny all-reduce per step: any rank that saw the signal makes every rank save at this same step
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        # rank 0 names it: a sharded checkpoint is one folder that every rank writes into
        path = trainer.strategy.broadcast(next_hpc_checkpoint(trainer.default_root_dir), src=0)
        if trainer.is_global_zero:
            log.warning("requeue signal: saving %s at step %d", path, trainer.global_step)
        trainer.save_checkpoint(path)
        ok = requeue_job() if trainer.is_global_zero else False
        if trainer.strategy.broadcast(ok, src=0):
            self.requeued = True
            trainer.should_stop = True
            # Lightning validates when a run stops early: not here, in the last seconds of the job, and not at a
            # step where an uninterrupted run would not (the requeued job's log would differ from it)
            trainer.limit_val_batches = 0

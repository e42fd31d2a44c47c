"""``python tests/_killed_run.py WHEN STEP train.py ARGS...``: run train.py and SIGKILL the process at a chosen point
of training, for the resume tests. The run is otherwise unchanged.

WHEN ``saved``: right after the checkpoint ``last.ckpt`` of global step STEP is on disk (Lightning has not yet logged
that step's row); ``step-file``: right after ``stepNNNNNNN.ckpt`` of step STEP is on disk, before ``last.ckpt`` of the
same step is written; ``step``: at the start of training step STEP (the work since the last checkpoint is lost).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys

when, at = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
sys.path.insert(0, os.getcwd())

import launch.train  # noqa: E402
import launch.trainer  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if when in ("saved", "step-file"):
    _save = launch.trainer.AtomicCheckpointIO.save_checkpoint

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        _save(self, checkpoint, path, storage_options)
        name = os.path.basename(str(path))
        if checkpoint["global_step"] == at and (name == "last.ckpt") == (when == "saved"):
            _die()

    launch.trainer.AtomicCheckpointIO.save_checkpoint = save_checkpoint
elif when == "step":
    class _KillAtStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == at:
                _die()

    _build = launch.train.build_trainer

    def build_trainer(cfg, run, callbacks=None, **kwargs):
        return _build(cfg, run, [*(callbacks or []), _KillAtStep()], **kwargs)

    launch.train.build_trainer = build_trainer
else:
    raise SystemExit(f"unknown WHEN {when!r}")

runpy.run_path("train.py", run_name="__main__")

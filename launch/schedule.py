"""The learning-rate schedule shared by the components: linear warmup, then cosine/linear decay (or constant).

The decay ends at ``trainer.max_steps`` or, when ``trainer.max_time`` stops the run first, at the end of that time
budget: a time-capped run on a slow machine anneals too, instead of stopping near its peak learning rate (the demo's
VQGAN reached 753 of 3000 steps in its 10 minutes on a 2-core AVX2 CPU and ended at 86% of the peak rate).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from pytorch_lightning import Callback
from pytorch_lightning.callbacks import Timer

from launch.config import ConfigError


def lr_factor(warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.0,
              budget_spent: Optional[Callable[[], float]] = None) -> Callable[[int], float]:
    """LambdaLR multiplier: ``(step+1)/warmup`` during warmup, then ``decay`` down to ``min_ratio`` at ``total``
    steps, or earlier when ``budget_spent()`` (the fraction of a time budget used, see :class:`TimeBudget`) says
    the run is further along than its step count."""
    if decay not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.decay must be cosine, linear or constant, got '{decay}'")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if budget_spent is not None:
            frac = max(frac, min(1.0, budget_spent()))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac
        return min_ratio + (1 - min_ratio) * shape

    return f


class TimeBudget(Callback):
    """The fraction of ``trainer.max_time`` spent, for the schedules (added by build_trainer when max_time is set).

    Rank 0's clock, shared every ``every`` steps, so DDP replicas apply the same learning rate. Lightning's Timer
    keeps the elapsed time in checkpoints, so a resumed run continues its budget."""

    def __init__(self, every: int = 10):
        self.every, self.spent = every, 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every and self.spent:
            return
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is None:
            return
        elapsed = timer.time_elapsed()
        spent = elapsed / max(elapsed + remaining, 1e-9)
        self.spent = float(trainer.strategy.broadcast(spent, src=0))


def budget_spent(module: Any) -> Callable[[], float]:
    """``budget_spent`` for :func:`lr_factor` in a LightningModule's configure_optimizers: 0 without a time budget."""

    def spent() -> float:
        trainer = getattr(module, "_trainer", None)
        for cb in trainer.callbacks if trainer is not None else ():
            if isinstance(cb, TimeBudget):
                return cb.spent
        return 0.0

    return spent

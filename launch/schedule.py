"""The learning-rate schedule shared by the components: linear warmup, then cosine/linear decay (or constant)."""
from __future__ import annotations

import math
from typing import Callable

from launch.config import ConfigError


def lr_factor(warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.0) -> Callable[[int], float]:
    """LambdaLR multiplier: ``(step+1)/warmup`` during warmup, then ``decay`` down to ``min_ratio`` at ``total``."""
    if decay not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.decay must be cosine, linear or constant, got '{decay}'")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac
        return min_ratio + (1 - min_ratio) * shape

    return f

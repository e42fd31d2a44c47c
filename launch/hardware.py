"""Where bf16 pays: the one place that decides what ``precision: auto`` (training) and ``precision="auto"``
(sampling) mean on this machine.

bf16 matrix products are fast on CUDA GPUs that support bf16 and on CPUs with AVX512-bf16 or AMX. On other CPUs
(AVX2 only) torch computes them on a slow path: a 2048² matmul ran at 0.34 GFLOP/s in bf16 against 125 GFLOP/s in
fp32 on a 2-core AVX2 EPYC, and the shapes prior's bf16-mixed training step was 10x slower than fp32 there.
"""
from __future__ import annotations

from typing import Union

import torch


def bf16_is_fast(device: Union[torch.device, str]) -> bool:
    """True where bf16 matrix products beat fp32 on ``device`` ("cpu", "cuda", "gpu" or a torch.device)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind in ("cuda", "gpu"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_trainer_precision(precision: str, accelerator: str) -> str:
    """A ``trainer.precision`` value for Lightning: "auto" -> "bf16-mixed" where bf16 is fast, else "32-true"."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_is_fast(accelerator) else "32-true"

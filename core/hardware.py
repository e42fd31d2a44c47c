"""Where bf16 pays: the one place that decides what ``precision: auto`` (training) and ``precision="auto"``
(sampling) mean on this machine.

bf16 matrix products are fast on CUDA GPUs that support bf16 and on CPUs with AVX512-bf16 or AMX. On other CPUs
(AVX2 only) torch computes them on a slow path: a 2048² matmul ran at 0.34 GFLOP/s in bf16 against 125 GFLOP/s in
fp32 on a 2-core AVX2 EPYC, and the shapes prior's bf16-mixed training step was 10x slower than fp32 there.

The same file decides which scaled-dot-product attention kernel training uses (``trainer.attention``): on a CPU in
bf16, torch's default flash kernel has a slow backward pass (docs/training.md, "Attention kernel").
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.nn.attention import SDPBackend

ATTENTION_KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


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


def attention_backends(choice: str, accelerator: str, precision: str) -> Optional[list[SDPBackend]]:
    """The kernels ``F.scaled_dot_product_attention`` may use while training; None leaves torch's own choice.

    ``choice``: "auto" | "default" | one of ATTENTION_KERNELS; ``accelerator``: the resolved "cpu" or "gpu";
    ``precision``: the resolved trainer precision. "auto" picks the math kernel on a CPU in bf16: there
    the flash kernel's backward pass took 390 of a 635 ms CLIP step and the math kernel's 199 (436 ms in all; the
    demo prior 757 -> 633 ms), with the same error against fp64. In fp32, and on GPUs, torch's choice stays.
    """
    check_attention(choice)
    if choice == "default":
        return None
    if choice == "auto":
        return [SDPBackend.MATH] if accelerator == "cpu" and precision.startswith("bf16") else None
    return [ATTENTION_KERNELS[choice]]


def check_attention(choice: str) -> None:
    """ValueError unless ``choice`` is a ``trainer.attention`` value."""
    if choice not in ("auto", "default", *ATTENTION_KERNELS):
        raise ValueError(f"trainer.attention must be auto, default or one of {', '.join(ATTENTION_KERNELS)}, "
                         f"got '{choice}'")

"""Where bf16 pays: the one place that decides what ``precision: auto`` (training) and ``precision="auto"``
(sampling) mean on this machine.

bf16 matrix products are fast on CUDA GPUs that support bf16 and on CPUs with AVX512-bf16 or AMX. On other CPUs
(AVX2 only) torch computes them on a slow path: a 2048² matmul ran at 0.34 GFLOP/s in bf16 against 125 GFLOP/s in
fp32 on a 2-core AVX2 EPYC, and the shapes prior's bf16-mixed training step was 10x slower than fp32 there.

The same file decides which scaled-dot-product attention kernel training uses (``trainer.attention``): on a CPU in
bf16, torch's default flash kernel has a slow backward pass (docs/training.md, "Attention kernel"), and which memory
layout the VQGAN trains in (``optim.channels_last: auto``, :func:`resolve_channels_last`).
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


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels run with: "AVX512", "AVX2", "DEFAULT", ... (``ATEN_CPU_CAPABILITY``
    lowers it)."""
    probe = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return probe() if probe else "DEFAULT"


def resolve_channels_last(choice: Union[bool, str], accelerator: str) -> bool:
    """The VQGAN's training layout, ``optim.channels_last``, for Lightning's resolved ``accelerator`` ("cpu" /
    "gpu", or "auto": a GPU when CUDA is available): ``true`` (NHWC) and ``false`` (NCHW) are kept; "auto" is NHWC on
    GPUs and on CPUs whose torch kernels run AVX512, NCHW on other CPUs.

    Measured with ``python -m bench.vqgan_step`` (one thread, both layouts interleaved in one process; fp32):

    ====================================  ==================  ==================  ===============
    CPU                                   f16 step NCHW       f16 step NHWC       shapes step
    ====================================  ==================  ==================  ===============
    2-core AMD EPYC (Zen 4), AVX512       19.1 s              18.0 s (1.06x)      NHWC 1.03x
    the same restricted to AVX2 [1]_      20.2 s              34.7 s (0.58x)      NHWC 1.05x
    a 2-core AVX2 CPU                     12.5 s              17.8 s (0.70x)
    ====================================  ==================  ==================  ===============

    .. [1] ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.

    With AVX2 kernels the NHWC backward pass is the slow part: inference (``--encode-decode``) is faster in NHWC on
    both (f16 1.06-1.08x, shapes 1.16-1.30x), which is why ``VQGAN.from_pretrained`` loads NHWC on every device. On
    GPUs cuDNN's tensor-core convolutions take NHWC natively (not measured here: no GPU was at hand).
    """
    if isinstance(choice, bool):
        return choice
    if choice != "auto":
        raise ValueError(f"optim.channels_last must be true, false or auto, got '{choice}'")
    kind = str(accelerator).split(":")[0]
    if kind == "auto":
        kind = "gpu" if torch.cuda.is_available() else "cpu"
    if kind in ("gpu", "cuda"):
        return True
    return kind == "cpu" and cpu_capability().startswith("AVX512")

"""FSDP2 (``fully_shard``) for the components, through Lightning's ModelParallelStrategy.

A component's LightningModule mixes in :class:`ShardedModule` and says what to shard: ``fsdp_root()`` (the
nn.Module holding all trained parameters) and ``fsdp_blocks()`` (the repeated blocks, each its own FSDP unit:
BART layers, CLIP residual blocks, VQGAN resolution levels). Under any other strategy nothing happens.
"""
from __future__ import annotations

from typing import Iterable, Optional

import pytorch_lightning as pl
import torch
from torch import nn


def apply_fsdp2(root: nn.Module, blocks: Iterable[nn.Module], mesh, precision: str = "32-true",
                activation_checkpointing: bool = False) -> None:
    """Shard each block, then the root (which then holds only what no block owns: embeddings, heads, norms)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if "bf16" in precision:
        # bf16 compute and communication, fp32 gradient reduction; master weights stay fp32 in the optimizer.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)


class ShardedModule(pl.LightningModule):
    """Mixin: implements ``configure_model`` for ModelParallelStrategy; harmless elsewhere."""

    fsdp_unsupported: Optional[str] = None  # a reason the component cannot be sharded (refused at start-up)

    def fsdp_root(self) -> nn.Module:
        raise NotImplementedError

    def fsdp_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def configure_model(self) -> None:
        from pytorch_lightning.strategies import ModelParallelStrategy

        trainer = getattr(self, "_trainer", None)
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        if getattr(self, "_fsdp_applied", False):
            return
        if self.fsdp_unsupported:
            raise RuntimeError(self.fsdp_unsupported)
        tc = self.hparams.get("trainer", {}) if hasattr(self, "hparams") else {}
        apply_fsdp2(self.fsdp_root(), self.fsdp_blocks(), self.device_mesh["data_parallel"],
                    precision=str(trainer.precision), activation_checkpointing=bool(tc.get("activation_checkpointing")))
        self._fsdp_applied = True


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

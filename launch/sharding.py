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
    _scalars_to_vectors(root)
    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)


def _scalars_to_vectors(root: nn.Module) -> None:
    """fully_shard cannot shard 0-d parameters (CLIP's logit_scale): make them shape (1,). ``match_shapes`` turns
    them back when the gathered state dict is loaded into an unsharded model."""
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0:
                module._parameters[name] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)


def match_shapes(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Reshape entries of ``state`` to ``target``'s shapes where only the shape (not the size) differs."""
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes and v.shape != shapes[k] and v.numel() == shapes[k].numel()
            else v for k, v in state.items()}


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

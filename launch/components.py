"""The registry of trainable components. Entries are import strings, so `train.py vqgan` never imports CLIP."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from omegaconf import DictConfig

if TYPE_CHECKING:  # importing Lightning costs seconds; the data, tokenizer, bundle and report CLIs never need it
    import pytorch_lightning as pl


@dataclass
class Component:
    """What a stage package gives the launcher.

    name: the command-line name (``python train.py NAME``).
    schema: a dataclass subclassing :class:`launch.config.RunConfig` with the component's own sections.
    build: ``build(cfg) -> LightningModule``; the module must implement ``export(out_dir)`` writing its
        ``save_pretrained`` folder, and may implement ``fsdp_blocks()`` (modules to shard with FSDP2).
    data_mode: the data module mode the component reads ("images" or "codes").
    manual_optimization: the module steps its optimizers itself, accumulating over
        ``trainer.accumulate_grad_batches`` and clipping per optimizer (Lightning refuses both Trainer settings then).
    fsdp_unsupported: why ``trainer.strategy: fsdp`` cannot work for this component (refused at start-up), if so.
    check: ``check(cfg)`` raising ConfigError on a combination of settings the component cannot run, called at
        start-up before anything is built or written.
    """

    name: str
    schema: type
    build: Callable[[DictConfig], pl.LightningModule]
    data_mode: str = "images"
    manual_optimization: bool = False
    fsdp_unsupported: Optional[str] = None
    check: Optional[Callable[[DictConfig], None]] = None


# stage name (its package's name) -> "module:attribute" of a Component instance
REGISTRY: dict[str, str] = {
    "vqgan": "vqgan.training:COMPONENT",
    "bart_prior": "bart_prior.training:COMPONENT",
    "clip_rank": "clip_rank.training:COMPONENT",
}
# names users typed before the stages were called by their package names
ALIASES: dict[str, str] = {"clip": "clip_rank", "prior": "bart_prior"}


def canonical_name(name: str) -> str:
    """A stage name or one of its aliases -> the stage name."""
    return ALIASES.get(name, name)


def get_component(name: str) -> Component:
    name = canonical_name(name)
    if name not in REGISTRY:
        raise KeyError(f"unknown component '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    module_name, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)

"""Typed run configuration: dataclass schemas + omegaconf YAML files with `extends` and dotlist overrides.

Every component's run config is a dataclass that subclasses :class:`RunConfig` and adds its own sections
(``model``, ``loss``, ``optim``...). Files are merged one at a time onto the structured schema, so a misspelled key
or a wrong type is reported with the file it came from, before any data is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.configs import file_chain
from core.errors import ConfigError
from data.config import DataConfig

__all__ = ["ConfigError", "RunConfig", "TrainerConfig", "load_config", "to_yaml"]


@dataclass
class TrainerConfig:
    """Arguments for ``pl.Trainer`` plus the strategy choice; see configs/trainer/*.yaml."""

    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    # auto (bf16-mixed where bf16 is fast: bf16 GPUs, AVX512-bf16/AMX CPUs; else 32-true) | 32-true | bf16-mixed
    # | bf16-true | 16-mixed
    precision: str = "32-true"
    # auto (math on a CPU in bf16, where the flash kernel's backward is slow; else torch's choice) | default (torch's
    # choice) | math | flash | efficient | cudnn: the scaled-dot-product attention kernel used while training
    attention: str = "auto"
    max_steps: int = 1000
    # "DD:HH:MM:SS"; training stops cleanly (and exports) when reached, and the LR decay ends there if it comes
    # before max_steps
    max_time: Optional[str] = None
    val_check_interval: int = 200  # optimizer steps between validations
    limit_val_batches: Optional[int] = None
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None  # automatic-optimisation components only
    checkpoint_every_n_steps: int = 500
    keep_checkpoints: int = 2  # step checkpoints kept besides last.ckpt
    progress_bar: bool = True
    deterministic: bool = False
    num_sanity_val_steps: int = 0
    num_threads: Optional[int] = None  # torch CPU threads per process (None: torch's default, one per core)
    # fsdp only: activation checkpointing of the blocks the component shards
    activation_checkpointing: bool = False


@dataclass
class RunConfig:
    """Sections shared by every component. Components subclass this and add their own."""

    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # auto: continue from runs/NAME/checkpoints/last.ckpt when present | never
    init_from: Optional[str] = None  # a save_pretrained folder to start the weights from
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _one_line(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        msg = "unknown key"
    where = f"'{key}'" if key else ""
    return ConfigError(f"{source}: {msg} {where}".strip())


def load_config(schema: type, path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``path`` (and the files it extends) and ``key=value`` overrides onto ``schema``.

    Returns a read-only-structured DictConfig; raises :class:`ConfigError` with one line on any problem.
    """
    cfg = OmegaConf.structured(schema)
    sources = file_chain(path) if path else []
    for source, part in sources:
        try:
            cfg = OmegaConf.merge(cfg, part)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, source) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"override '{item}'") from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, path or "config") from None
    return cfg


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# trainer settings and the least value each takes (an unset optional one is not checked)
_TRAINER_LEAST = {"max_steps": 1, "val_check_interval": 1, "log_every_n_steps": 1, "accumulate_grad_batches": 1,
                  "checkpoint_every_n_steps": 1, "keep_checkpoints": -1, "num_nodes": 1, "limit_val_batches": 0,
                  "num_sanity_val_steps": 0, "num_threads": 1}
# model settings that are sizes or counts: zero is as impossible for them as a negative value (a zero-entry codebook,
# a zero-wide layer); every other integer of a model section must only not be negative
_MODEL_SIZES = {"num_codes", "codebook_size", "embed_dim", "codebook_dim", "resolution", "ch", "z_channels",
                "norm_groups", "in_channels", "out_channels", "d_model", "attention_heads", "ffn_dim",
                "max_text_length", "usage_window", "restart_every", "image_size", "patch_size", "width", "heads",
                "head_width", "context_length", "vocab_size", "image_vocab_size", "text_vocab_size"}


def _check_model_section(node: Any, path: str) -> None:
    if isinstance(node, (DictConfig, dict)):
        for key in node:
            try:
                value = node[key]
            except OmegaConfBaseException:  # a missing value: reported by load_config
                continue
            _check_model_section(value, f"{path}.{key}")
        return
    if isinstance(node, (ListConfig, list, tuple)):
        for i, value in enumerate(node):
            _check_model_section(value, f"{path}[{i}]")
        return
    if isinstance(node, bool) or not isinstance(node, int):
        return
    name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    least = 1 if name in _MODEL_SIZES or "[" in path.rsplit(".", 1)[-1] else 0
    if node < least:
        raise ConfigError(f"{path} must be >= {least}, got {node}")


def check_values(cfg: DictConfig) -> None:
    """ConfigError naming the first setting out of range, before anything is built or written: the ``trainer``
    section, the ``data`` section (data.config.check_values) and every integer of the ``model`` section (sizes and
    counts >= 1, list entries >= 1, other integers >= 0), then the model config's own checks where it has them (a
    ``check()`` method, or validation when the dataclass is built)."""
    from data.config import check_values as check_data_values

    tc = cfg.trainer
    for name, least in _TRAINER_LEAST.items():
        value = tc.get(name)
        if value is not None and int(value) < least:
            raise ConfigError(f"trainer.{name} must be >= {least}, got {value}")
    if not (tc.devices == "auto" or (isinstance(tc.devices, int) and not isinstance(tc.devices, bool)
                                     and tc.devices >= 1)):
        raise ConfigError(f"trainer.devices must be 'auto' or >= 1, got {tc.devices!r}")
    if tc.max_time is not None:
        parts = str(tc.max_time).split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"trainer.max_time must be DD:HH:MM:SS, got '{tc.max_time}'")
    check_data_values(cfg.data)
    if "model" in cfg:
        _check_model_section(cfg.model, "model")
        try:
            model = OmegaConf.to_object(cfg.model)
        except (ValueError, TypeError, OmegaConfBaseException) as exc:
            raise ConfigError(f"model: {str(exc).splitlines()[0]}") from None
        if callable(getattr(model, "check", None)):
            model.check()

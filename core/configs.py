"""Reading the project's YAML config files: ``extends`` chains, and the ``model:`` section of a shipped config as a
named model size (``vqgan.preset("shapes")`` is the ``model:`` section of configs/vqgan/shapes.yaml), so that model
sizes are written in one place, the configs."""
from __future__ import annotations

import collections.abc
import os
import types
import typing

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError

# configs/ beside the packages: this project runs from its checkout (`pip install -e .`)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def read_yaml(path: str) -> DictConfig:
    """One YAML file as a DictConfig; a missing file, bad YAML or a non-mapping top level is a one-line error."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return cfg


def file_chain(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The files to merge, bases first. ``extends:`` lists paths relative to the file that names them."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    cfg = read_yaml(path)
    bases = cfg.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    chain: list[tuple[str, DictConfig]] = []
    for base in bases:
        chain += file_chain(os.path.join(os.path.dirname(path), str(base)), seen + (path,))
    chain.append((path, cfg))
    return chain


def preset_names(stage: str) -> list[str]:
    """The shipped configs of ``stage`` that define a ``model:`` section."""
    folder = os.path.join(CONFIGS_DIR, stage)
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
    return [n for n in names if any("model" in part for _, part in file_chain(os.path.join(folder, n + ".yaml")))]


def model_preset(stage: str, name: str) -> dict:
    """The ``model:`` section of configs/STAGE/NAME.yaml (its ``extends`` chain merged) as a plain dict."""
    path = os.path.join(CONFIGS_DIR, stage, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"unknown {stage} preset '{name}'; choose one of {', '.join(preset_names(stage))} "
                          f"(the model sections of configs/{stage}/*.yaml)")
    merged = OmegaConf.create({})
    for _, part in file_chain(path):
        if "model" in part:
            merged = OmegaConf.merge(merged, part.model)
    return OmegaConf.to_container(merged, resolve=True)


def _fits(value: object, tp: object) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):  # a JSON list, or an omegaconf ListConfig
        if not isinstance(value, collections.abc.Sequence) or isinstance(value, (str, bytes)):
            return False
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict or tp is dict:
        return isinstance(value, collections.abc.Mapping)
    return True


def check_field_types(cls: type, values: dict, source: str, error: type[Exception] = ConfigError) -> None:
    """``error`` naming the first key of ``values`` whose value does not have the type of ``cls``'s field of that
    name (a model folder's config.json read into a dataclass: int, float, bool, str, lists of them, Optional)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            tp = hints[key]
            expected = str(tp).replace("typing.", "") if typing.get_args(tp) else getattr(tp, "__name__", str(tp))
            raise error(f"{source}: '{key}' is {value!r}, expected {expected}")

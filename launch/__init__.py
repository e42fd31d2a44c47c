"""Training plumbing shared by the three stages: config schemas and loading, the trainer and its strategies, run
folders and resume, SLURM submission and requeue, LR schedules and FSDP2 sharding. It imports no stage package:
stages are found through the component registry (launch.components) when a run starts."""
from typing import Any

from launch.components import Component, get_component
from launch.config import ConfigError, RunConfig, TrainerConfig, load_config

__all__ = ["Component", "ConfigError", "RunConfig", "TrainerConfig", "get_component", "load_config"]

# Names that lived here before the pipeline got its own package; kept so that old scripts run.
_MOVED = {"Pipeline": "pipeline", "GeneratedImage": "pipeline", "make_grid": "pipeline", "save_png": "pipeline",
          "log_image_grid": "launch.images"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        if _MOVED[name] == "pipeline":
            warnings.warn(f"launch.{name} moved: use 'from pipeline import {name}'", DeprecationWarning, stacklevel=2)
        value = globals()[name] = getattr(importlib.import_module(_MOVED[name]), name)  # warn once
        return value
    raise AttributeError(f"module 'launch' has no attribute '{name}'")

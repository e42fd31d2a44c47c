"""Run folders (runs/NAME/...) and the choice of checkpoint to resume from."""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from core.files import atomic_file
from launch.config import ConfigError, to_yaml

log = logging.getLogger(__name__)


@dataclass
class RunDir:
    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def export(self) -> str:
        return os.path.join(self.root, "export")

    @property
    def images(self) -> str:
        return os.path.join(self.root, "images")

    @property
    def config_file(self) -> str:
        return os.path.join(self.root, "config.yaml")

    def write_config(self, cfg: DictConfig) -> None:
        os.makedirs(self.root, exist_ok=True)
        with atomic_file(self.config_file) as fh:
            fh.write(to_yaml(cfg))


def _loadable(path: str) -> bool:
    if os.path.isdir(path):  # a sharded (FSDP) checkpoint: Lightning's meta.pt and torch.distributed's .metadata
        missing = [n for n in ("meta.pt", ".metadata") if not os.path.isfile(os.path.join(path, n))]
        if missing:
            log.warning("checkpoint %s is incomplete (no %s); trying an older one", path, missing[0])
        return not missing
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception as exc:  # a torn or corrupt file: zip errors, unpickling errors, EOF
        log.warning("checkpoint %s is unreadable (%s); trying an older one", path, str(exc).splitlines()[0][:120])
        return False


def find_resume_checkpoint(run: RunDir) -> Optional[str]:
    """The newest checkpoint of the run that loads: last.ckpt, a step checkpoint, or the one Lightning writes on
    SLURM's SIGUSR1 (``hpc_ckpt_N.ckpt`` in the run folder). A corrupt newest one falls back to the previous."""
    candidates = [os.path.join(run.checkpoints, "last.ckpt")]
    candidates += glob.glob(os.path.join(run.checkpoints, "step*.ckpt"))
    candidates += glob.glob(os.path.join(run.root, "hpc_ckpt_*.ckpt"))
    candidates = sorted((p for p in candidates if os.path.exists(p)), key=os.path.getmtime, reverse=True)
    for path in candidates:
        if _loadable(path):
            return path
    return None


def prepare_run(cfg: DictConfig) -> tuple[RunDir, Optional[str]]:
    """Pick the run folder and the checkpoint to resume from, following ``cfg.resume``."""
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume must be 'auto' or 'never', got '{cfg.resume}'")
    root = os.path.join(cfg.runs_dir, cfg.name)
    if cfg.resume == "never":
        n = 1
        while os.path.exists(root) and os.listdir(root):
            n += 1
            root = os.path.join(cfg.runs_dir, f"{cfg.name}-{n}")
    run = RunDir(os.path.abspath(root))
    ckpt = find_resume_checkpoint(run) if cfg.resume == "auto" else None
    return run, ckpt

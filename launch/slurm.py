"""sbatch scripts for `train.py COMPONENT --slurm`: srun one task per device, SIGUSR1 before the time limit, requeue.

Lightning's SLURM environment does the rendezvous; on SIGUSR1 ``launch.requeue.SlurmRequeue`` has all ranks save
``hpc_ckpt_N.ckpt`` in the run folder at the same step and requeues the job; the requeued job runs the same command,
and ``resume: auto`` picks that checkpoint up.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import DictConfig

from core.files import atomic_file
from launch.config import ConfigError
from launch.run import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU tasks; ntasks-per-node then comes from trainer.devices
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    signal_seconds: int = 90  # SIGUSR1 this long before the time limit, so the checkpoint has time to be written


def tasks_per_node(cfg: DictConfig, opts: SlurmOptions) -> int:
    if opts.gpus_per_node:
        return opts.gpus_per_node
    if not isinstance(cfg.trainer.devices, int):
        raise ConfigError("with --gpus-per-node 0, trainer.devices must be a number of CPU processes per node")
    return int(cfg.trainer.devices)


def render_sbatch(component: str, config_path: Optional[str], overrides: Sequence[str], cfg: DictConfig,
                  run: RunDir, opts: SlurmOptions) -> str:
    ntasks = tasks_per_node(cfg, opts)
    accelerator = "gpu" if opts.gpus_per_node else "cpu"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={os.path.basename(run.root)}",
        f"#SBATCH --nodes={opts.nodes}",
        f"#SBATCH --ntasks-per-node={ntasks}",
        f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
        f"#SBATCH --time={opts.time}",
        f"#SBATCH --signal=SIGUSR1@{opts.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run.root}/slurm-%j.out",
        f"#SBATCH --error={run.root}/slurm-%j.err",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    # The run folder is pinned (name, runs_dir, resume auto) so that a requeued job continues the same run.
    args = [os.path.abspath(os.path.join(REPO, "train.py")), component]
    if config_path:
        args += ["--config", os.path.abspath(config_path)]
    args += list(overrides) + [
        f"name={os.path.basename(run.root)}", f"runs_dir={os.path.dirname(run.root)}", "resume=auto",
        f"trainer.accelerator={accelerator}", f"trainer.devices={ntasks}", f"trainer.num_nodes={opts.nodes}",
        "trainer.progress_bar=false",
    ]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
        "export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        f"srun {shlex.quote(sys.executable)} {' '.join(shlex.quote(a) for a in args)}",
        "",
    ]
    return "\n".join(lines)


def submit(script: str, run: RunDir) -> str:
    """Write ``run/job.sbatch`` and submit it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run on a SLURM login node, or use --dry-run to print the script")
    os.makedirs(run.root, exist_ok=True)
    path = os.path.join(run.root, "job.sbatch")
    with atomic_file(path) as fh:
        fh.write(script)
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sbatch failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return out.stdout.strip().split(";")[0]

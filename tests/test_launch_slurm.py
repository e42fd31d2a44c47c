"""`train.py COMPONENT --slurm`: the sbatch script, and a real 2-task job on a local SLURM cluster."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_script(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "vqgan", "--config", "configs/vqgan/tiny.yaml", f"runs_dir={tmp_path}",
         "name=job", "trainer.devices=2", "trainer.strategy=ddp", "--slurm", "--dry-run", "--nodes", "1",
         "--time", "00:10:00", "--partition", "debug"],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 "#SBATCH --partition=debug", "#SBATCH --time=00:10:00", f"#SBATCH --output={tmp_path}/job/slurm-%j.out"):
        assert line in script
    assert "srun " in script and "trainer.devices=2" in script and "resume=auto" in script
    assert not (tmp_path / "job" / "job.sbatch").exists()  # a dry run writes nothing


def test_gpu_script_uses_gpus_per_node(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "vqgan", "--config", "configs/vqgan/tiny.yaml", f"runs_dir={tmp_path}",
         "--slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--account", "proj"],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --gpus-per-node=4" in out.stdout and "#SBATCH --ntasks-per-node=4" in out.stdout
    assert "trainer.num_nodes=2" in out.stdout and "trainer.accelerator=gpu" in out.stdout
    assert "#SBATCH --account=proj" in out.stdout

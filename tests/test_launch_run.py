"""Run folders: which checkpoint a rerun resumes from, and `resume: never`."""
import os
import time

import torch

from launch.config import RunConfig, load_config
from launch.run import RunDir, find_resume_checkpoint, prepare_run


def save(path, step):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"global_step": step}, path)
    time.sleep(0.01)  # distinct modification times


def test_newest_loadable_checkpoint_wins_and_corrupt_falls_back(tmp_path):
    run = RunDir(str(tmp_path))
    assert find_resume_checkpoint(run) is None
    save(os.path.join(run.checkpoints, "step0000010.ckpt"), 10)
    save(os.path.join(run.checkpoints, "last.ckpt"), 20)
    assert find_resume_checkpoint(run).endswith("last.ckpt")
    save(os.path.join(run.root, "hpc_ckpt_1.ckpt"), 25)  # written by Lightning on SLURM's SIGUSR1
    assert find_resume_checkpoint(run).endswith("hpc_ckpt_1.ckpt")
    with open(os.path.join(run.root, "hpc_ckpt_1.ckpt"), "r+b") as fh:
        fh.truncate(100)  # a torn write
    assert find_resume_checkpoint(run).endswith("last.ckpt")


def test_resume_never_starts_a_new_folder(tmp_path):
    cfg = load_config(RunConfig, None, [f"runs_dir={tmp_path}", "name=exp", "resume=never"])
    run, ckpt = prepare_run(cfg)
    assert run.root == str(tmp_path / "exp") and ckpt is None
    save(os.path.join(run.checkpoints, "last.ckpt"), 5)
    run2, ckpt2 = prepare_run(cfg)
    assert run2.root == str(tmp_path / "exp-2") and ckpt2 is None
    auto = load_config(RunConfig, None, [f"runs_dir={tmp_path}", "name=exp"])
    assert prepare_run(auto)[1].endswith("last.ckpt")

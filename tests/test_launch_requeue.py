"""SIGUSR1 inside a SLURM job step: save hpc_ckpt_N.ckpt at a step boundary, `scontrol requeue`, stop without export;
the rerun resumes from it and ends exactly as an uninterrupted run. Runs without a cluster: SLURM's environment
variables and a recording `scontrol` (tests/test_launch_slurm.py runs the same on a real one)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import time


from _launch_helpers import REPO, env, final_step, make_data, run_train, train_cmd
from _resume_helpers import assert_same_run
from launch.requeue import next_hpc_checkpoint


def test_next_hpc_checkpoint_counts_up(tmp_path):
    assert next_hpc_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_7.ckpt").mkdir()  # a sharded checkpoint is a folder
    assert next_hpc_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_8.ckpt")


def slurm_env(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    fake.chmod(0o755)
    return dict(env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="1",
                SLURM_JOB_NAME="requeue-test", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0",
                SLURM_NODEID="0")


def test_sigusr1_saves_requeues_and_the_rerun_resumes_exactly(tmp_path):
    """After SIGUSR1 the run saves, requeues and stops at a step boundary; the rerun (the same command, as the
    requeued job runs it) ends exactly as an uninterrupted run: weights, optimizer state and every logged row."""
    data = make_data(str(tmp_path / "data"))
    steps = 60
    extra = (f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.checkpoint_every_n_steps=5",
             "data.resampled=true")
    cmd = train_cmd("bart_prior", data, str(tmp_path), "job", *extra)
    run = tmp_path / "job"
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not glob.glob(str(run / "checkpoints" / "step*.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped for requeue" in err and "export" not in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run / "hpc_ckpt_1.ckpt").is_file() and not os.path.exists(run / "export")
    stopped_at = final_step(str(run))
    assert 5 <= stopped_at < steps

    rerun = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "hpc_ckpt_1.ckpt" in rerun.stderr
    assert final_step(str(run)) == steps and os.listdir(run / "export")
    run_train(train_cmd("bart_prior", data, str(tmp_path), "straight", *extra))
    assert_same_run(str(tmp_path / "straight"), str(run), "bart_prior")

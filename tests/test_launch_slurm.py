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


# ---- a real single-node cluster --------------------------------------------------------------------------------
import glob  # noqa: E402
import time  # noqa: E402

from _launch_helpers import COMPONENTS, final_step, make_data, run_train, train_cmd  # noqa: E402
from _resume_helpers import assert_same_run  # noqa: E402
from slurm_cluster import ensure_installed, slurm_cluster, wait_for_job  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as env:
        yield env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("slurm-data")))


def submit(cmd, env):
    out = subprocess.run(cmd + ["--slurm"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def job_log(run_dir):
    return "\n".join(open(p).read() for p in sorted(glob.glob(os.path.join(run_dir, "slurm-*.*"))))


@pytest.mark.slurm
@pytest.mark.parametrize("component", COMPONENTS)
def test_two_task_job_trains_and_exports(component, cluster, data, tmp_path):
    cmd = train_cmd(component, data, str(tmp_path), "job", "trainer.devices=2", "trainer.strategy=ddp",
                    "trainer.max_steps=6", "trainer.val_check_interval=6")
    job = submit(cmd, cluster)
    state = wait_for_job(job, cluster, timeout=300)
    run = tmp_path / "job"
    assert state == "COMPLETED", f"job {job}: {state}\n{job_log(run)[-4000:]}"
    assert (run / "job.sbatch").exists() and os.listdir(run / "export")
    assert final_step(str(run)) == 6 if component != "vqgan" else final_step(str(run)) > 0


@pytest.mark.slurm
def test_sigusr1_checkpoints_requeues_and_resumes_exactly(cluster, data, tmp_path):
    """What a preempted job sees: SIGUSR1 -> the job saves hpc_ckpt_1.ckpt at a step boundary and requeues; the
    requeued job resumes and ends exactly as an uninterrupted 2-rank run: exported weights, last.ckpt's optimizer
    state and every logged row equal."""
    steps = 100
    extra = ("trainer.devices=2", "trainer.strategy=ddp", f"trainer.max_steps={steps}",
             f"trainer.val_check_interval={steps}", "trainer.checkpoint_every_n_steps=10", "data.resampled=true")
    cmd = train_cmd("bart_prior", data, str(tmp_path), "pre", *extra)
    job = submit(cmd, cluster)
    run = tmp_path / "pre"
    deadline = time.time() + 180
    while not glob.glob(str(run / "checkpoints" / "step*.ckpt")):
        assert time.time() < deadline, job_log(run)[-4000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    # slurmctld holds a requeued job for about two minutes before it may start again; start it at once
    deadline = time.time() + 120
    while True:
        info = subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True).stdout
        if "Restarts=1" in info and "JobState=PENDING" in info:
            break
        assert time.time() < deadline, info + job_log(run)[-3000:]
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    # meanwhile, the uninterrupted run: the same 2 ranks, launched here
    run_train(train_cmd("bart_prior", data, str(tmp_path), "straight", *extra), timeout=600)
    state = wait_for_job(job, cluster, timeout=400)
    log = job_log(run)
    assert state == "COMPLETED", f"{state}\n{log[-1500:]}"
    assert glob.glob(str(run / "hpc_ckpt_*.ckpt")), log[-4000:]
    info = subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info
    assert "requeue signal: saving" in log and "requeued SLURM job" in log
    assert "resuming from" in log and "hpc_ckpt" in log
    assert final_step(str(run)) == steps
    assert_same_run(str(tmp_path / "straight"), str(run), "bart_prior")

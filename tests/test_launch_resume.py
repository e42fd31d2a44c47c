"""Kill a training run with SIGKILL mid-epoch, rerun the same command: it resumes from the last checkpoint and
ends where an uninterrupted run ends (same step, same losses within tolerance)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import pytest
import torch

from _launch_helpers import COMPONENTS, REPO, env, final_step, logged, make_data, run_train, train_cmd

STEPS, EVERY = 40, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("resume-data")))


def kill_after_first_checkpoint(cmd: list[str], ckpt_dir: str, timeout: float = 240) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(os.path.join(ckpt_dir, "step*.ckpt")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    err = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    proc.kill()
    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed mid-training: {err}")


@pytest.mark.parametrize("component", COMPONENTS)
def test_kill_and_resume_matches_uninterrupted(component, data, tmp_path):
    common = (f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={EVERY}",
              "trainer.log_every_n_steps=1", f"trainer.val_check_interval={STEPS}", "seed=3")
    run_train(train_cmd(component, data, str(tmp_path), "straight", *common))
    killed = train_cmd(component, data, str(tmp_path), "killed", *common)
    kill_after_first_checkpoint(killed, str(tmp_path / "killed" / "checkpoints"))
    assert not os.path.exists(tmp_path / "killed" / "export")  # it really died before the end
    interrupted_at = final_step(str(tmp_path / "killed"))
    assert 0 < interrupted_at < final_step(str(tmp_path / "straight"))
    run_train(killed)  # the same command again: resume: auto
    assert final_step(str(tmp_path / "killed")) == final_step(str(tmp_path / "straight"))
    straight = dict(logged(str(tmp_path / "straight"), "train/loss"))
    resumed = dict(logged(str(tmp_path / "killed"), "train/loss"))
    last = max(straight)
    assert last in resumed and resumed[last] == pytest.approx(straight[last], rel=0.02, abs=1e-3)
    # The CSV log keeps the history from before the kill, without the steps logged twice around it. The row of
    # the step that wrote the checkpoint is logged just after it: a kill in between may lose that one row.
    steps = [s for s, _ in logged(str(tmp_path / "killed"), "train/loss")]
    assert steps == sorted(set(steps))
    assert set(straight) - set(steps) <= {interrupted_at - 1}, sorted(set(straight) - set(steps))

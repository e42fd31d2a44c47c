"""The strategies of launch/trainer.py on 2 CPU processes (gloo): DDP and FSDP2 match one process, and a sharded
run exports a consolidated, unsharded state dict."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "scripts", "toy_parallel.py")


def run_toy(strategy, devices, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, SCRIPT, strategy, str(devices), "16", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.load(open(out / "losses.json")), torch.load(out / "export" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_toy("auto", 1, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, single, tmp_path):
    losses, state = run_toy(strategy, 2, tmp_path)
    ref_losses, ref_state = single
    assert len(losses) == len(ref_losses) == 6
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-5)
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-4)
    assert losses[-1] < losses[0]
    # The export is a plain (consolidated) state dict with the same keys and values, whatever the strategy.
    assert set(state) == set(ref_state)
    for k in ref_state:
        assert type(state[k]) is torch.Tensor and state[k].shape == ref_state[k].shape
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)
    if strategy == "fsdp":  # distributed checkpoints are folders
        assert os.path.isdir(tmp_path / "checkpoints" / "last.ckpt")

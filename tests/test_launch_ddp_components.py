"""2-process DDP (gloo) of each component lands where one process lands on the same global batches."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _launch_helpers import REPO, env, make_data

SCRIPT = os.path.join(REPO, "tests", "scripts", "component_parallel.py")
# what makes the per-rank computation differ from the global one is switched off: the VQGAN's GAN term (its adaptive
# weight is a ratio of per-rank gradient norms, its discriminator has per-rank BatchNorm statistics) and random
# caption dropout / reconstruction, whose per-rank draws differ from one process's draws
SETTINGS = {"vqgan": ["loss.disc_weight=0", "loss.perceptual_weight=0", "model.restart_dead=false"],
            "bart_prior": ["train.caption_dropout=0", "train.sample_every_n_validations=0"],
            "clip": ["model.reconstruct_prob=0"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("ddp-data")))


def train(component, strategy, devices, out, data):
    pattern = [d.split("=", 1)[1] for d in data[component] if d.startswith("data.train=")][0]
    extra = [d for d in data[component] if d.startswith("tokenizer.")]
    res = subprocess.run([sys.executable, SCRIPT, component, strategy, str(devices), str(out), pattern,
                          *extra, *SETTINGS[component]], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out / "state.pt", weights_only=True)


@pytest.mark.parametrize("component", ["vqgan", "bart_prior", "clip"])
def test_ddp_two_processes_match_one(component, data, tmp_path):
    one = train(component, "auto", 1, tmp_path / "one", data)
    two = train(component, "ddp", 2, tmp_path / "two", data)
    changed = 0
    for k, v in one.items():
        if not torch.is_floating_point(v):
            continue
        torch.testing.assert_close(two[k], v, rtol=1e-3, atol=1e-4, msg=lambda m: f"{component} {k}: {m}")
        changed += 1
    assert changed > 0

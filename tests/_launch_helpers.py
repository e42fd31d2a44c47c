"""Tiny training runs of each component through `train.py`, for the resume, SLURM and demo tests."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("vqgan", "bart_prior", "clip")
CONFIG = {"vqgan": "configs/vqgan/tiny.yaml", "bart_prior": "configs/bart_prior/tiny.yaml",
          "clip": "configs/clip_rank/tiny.yaml"}


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)


def make_data(root: str) -> dict[str, list[str]]:
    """Image shards (32 px shapes), code shards and a tokenizer under ``root``; returns each component's
    data overrides."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from _bart_prior_helpers import make_tokenizer, write_code_shards

    shapes = os.path.join(root, "shapes")
    if not os.path.exists(os.path.join(shapes, "manifest.json")):
        subprocess.run([sys.executable, "-m", "data", "prepare", "shapes", "--out", shapes, "--num-samples", "240",
                        "--resolution", "32", "--shard-size", "40"], cwd=REPO, env=env(), check=True,
                       capture_output=True)
    codes = os.path.join(root, "codes")
    if not os.path.isdir(codes):
        write_code_shards(os.path.join(codes, "train"), 256)
        write_code_shards(os.path.join(codes, "val"), 32, seed=1)
        make_tokenizer(os.path.join(root, "tokenizer"))
    images = [f"data.train={shapes}/train/*.tar", f"data.val={shapes}/val/*.tar"]
    return {"vqgan": images, "clip": images,
            "bart_prior": [f"data.train={codes}/train/*.tar", f"data.val={codes}/val/*.tar",
                           f"tokenizer.path={root}/tokenizer"]}


def train_cmd(component: str, data: dict, runs_dir: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, "train.py", component, "--config", CONFIG[component], f"runs_dir={runs_dir}",
            f"name={name}", "trainer.progress_bar=false", *data[component], *extra]


def run_train(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def final_step(run_dir: str) -> int:
    """global_step of the checkpoint a rerun would resume from."""
    from launch.run import RunDir, find_resume_checkpoint

    path = find_resume_checkpoint(RunDir(run_dir))
    assert path is not None, f"no checkpoint in {run_dir}"
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def logged(run_dir: str, key: str) -> list[tuple[int, float]]:
    """(step, value) rows of one metric in a run's CSV log."""
    rows = []
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as fh:
        for row in csv.DictReader(fh):
            if row.get(key):
                rows.append((int(row["step"]), float(row[key])))
    return rows

"""What an exact resume must reproduce, read from two run folders: the exported weights, the optimizer, scheduler and
model states and step counters in ``checkpoints/last.ckpt``, and every row of ``csv/metrics.csv``."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file

from _launch_helpers import REPO, env

WEIGHTS = {"vqgan": "model.safetensors", "bart_prior": "model.safetensors", "clip": "open_clip_model.safetensors"}


def killed_run(cmd: list[str], when: str, step: int, timeout: float = 300) -> None:
    """Run ``cmd`` (a train.py command) and SIGKILL it at ``when``/``step`` (see tests/_killed_run.py)."""
    res = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_killed_run.py"), when, str(step), *cmd[1:]],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == -signal.SIGKILL, f"not killed at {when} {step} (rc {res.returncode}): {res.stderr[-3000:]}"


def killed_by_parent(cmd: list[str], after: float, timeout: float = 300) -> tuple[bool, str]:
    """Run ``cmd`` and SIGKILL it from here ``after`` seconds after it logs that it resumes (or starts training):
    (whether it was killed rather than ending first, its stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    started = None
    while time.time() < deadline and proc.poll() is None:
        if started is None and any("resuming from" in line or "| Name" in line for line in list(lines)):
            started = time.time()
        if started is not None and time.time() >= started + after:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join(10)
            return True, "".join(lines)
        time.sleep(0.01)
    proc.wait()
    reader.join(10)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    return False, "".join(lines)


def _close(a, b, tol: float, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if tol == 0 or not a.is_floating_point():
            assert torch.equal(a, b), f"{where}: max difference {(a.double() - b.double()).abs().max().item()}"
        else:
            torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), (where, sorted(a, key=str),
                                                                                   sorted(b, key=str))
        for k in a:
            _close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and tol:
        assert abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, (where, a, b)


def metric_rows(run_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(run_dir, "csv", "metrics.csv"), newline="") as fh:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def assert_same_run(straight: str, resumed: str, component: str, tol: float = 0.0) -> dict:
    """The two runs ended the same: exported weights, last.ckpt's model/optimizer/scheduler states and counters,
    the data position, and every logged row (train/loss among them), equal (within ``tol`` where > 0). Returns
    what was compared, for messages."""
    name = WEIGHTS[component]
    a, b = (load_file(os.path.join(d, "export", name)) for d in (straight, resumed))
    _close(a, b, tol, f"export/{name}")
    ca, cb = (torch.load(os.path.join(d, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
              for d in (straight, resumed))
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "ShardDataModule"):
        _close(ca[key], cb[key], tol, f"last.ckpt[{key}]")
    rows_a, rows_b = metric_rows(straight), metric_rows(resumed)
    if tol == 0:
        assert rows_a == rows_b, next((i, x, y) for i, (x, y) in enumerate(zip(rows_a, rows_b)) if x != y) \
            if len(rows_a) == len(rows_b) else (len(rows_a), len(rows_b))
    else:
        _close([{k: float(v) for k, v in r.items()} for r in rows_a],
               [{k: float(v) for k, v in r.items()} for r in rows_b], tol, "metrics.csv")
    return {"tensors": len(a), "rows": len(rows_a), "losses": sum("train/loss" in r for r in rows_a)}

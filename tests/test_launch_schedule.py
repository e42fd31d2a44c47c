"""The shared LR schedule: warmup, decay, and annealing by trainer.max_time when the time budget ends a run first."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch_helpers import logged, make_data, run_train, train_cmd  # noqa: E402

from launch.schedule import lr_factor  # noqa: E402


def test_budget_spent_moves_the_decay_forward():
    plain = lr_factor(10, 1010, "cosine", 0.1)
    assert lr_factor(10, 1010, "cosine", 0.1, lambda: 0.0)(20) == plain(20)
    assert lr_factor(10, 1010, "cosine", 0.1, lambda: 0.5)(20) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_factor(10, 1010, "cosine", 0.1, lambda: 1.0)(20) == pytest.approx(0.1)  # budget spent: the floor
    assert lr_factor(10, 1010, "linear", 0.0, lambda: 0.25)(20) == pytest.approx(0.75)
    assert lr_factor(10, 1010, "cosine", 0.1, lambda: 0.01)(900) == plain(900)  # the further of steps and time
    assert lr_factor(10, 1010, "cosine", 0.1, lambda: 1.0)(5) == pytest.approx(0.6)  # warmup stays in steps
    assert lr_factor(10, 1010, "constant", 0.1, lambda: 1.0)(500) == 1.0


def test_time_capped_run_ends_annealed(tmp_path):
    """max_steps far out of reach, 12 s of max_time: the logged LR still decays to its floor by the end."""
    data = make_data(str(tmp_path / "data"))
    run_train(train_cmd("bart_prior", data, str(tmp_path), "capped", "trainer.max_steps=1000000",
                        "trainer.max_time=00:00:00:12", "trainer.log_every_n_steps=1", "trainer.val_check_interval=50",
                        "optim.min_lr_ratio=0.1"), timeout=240)
    lrs = logged(str(tmp_path / "capped"), "train/lr")
    steps = [s for s, _ in lrs]
    assert 20 < max(steps) < 1000000 // 100  # stopped by time, long before max_steps
    peak = max(v for _, v in lrs)
    assert peak == pytest.approx(3e-3, rel=1e-3)
    assert lrs[-1][1] < 0.25 * peak  # annealed (a step-based cosine would still be at ~100% of the peak)
    later = [v for s, v in lrs if s > 10]
    assert all(b <= a + 1e-12 for a, b in zip(later, later[1:]))  # monotone after warmup

"""Kill a training run with SIGKILL, rerun the same command: it resumes from its last checkpoint and ends exactly where
an uninterrupted run ends. On the CPU in fp32 the exported weights, the optimizer, scheduler and model states and
counters in last.ckpt, the data position and every logged row (train/loss among them) are bitwise equal, for the
three stages, with data.resampled on and off, with 0 and 2 loader workers, killed right after a checkpoint (before
the step's row is logged), between a step checkpoint and last.ckpt, mid-way between checkpoints, at an epoch
boundary, and at a random moment from outside."""
from __future__ import annotations

import os
import random

import pytest

from _launch_helpers import final_step, logged, make_data, run_train, train_cmd
from _resume_helpers import assert_same_run, killed_by_parent, killed_run, metric_rows

STEPS, EVERY = 40, 8
# batches per epoch of the tiny sets: bart_prior 256 codes / 8 = 32, clip 216 images / 16 = 13 (14 resampled),
# vqgan 216 / 4 = 54
EPOCH = {"bart_prior": 32, "clip": 13, "vqgan": 54}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("resume-data")))


def commands(component, data, tmp_path, *extra):
    common = (f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={EVERY}", "trainer.log_every_n_steps=1",
              f"trainer.val_check_interval={STEPS}", "seed=3", *extra)
    return (train_cmd(component, data, str(tmp_path), "straight", *common),
            train_cmd(component, data, str(tmp_path), "killed", *common))


def test_prior_killed_three_times_ends_as_the_uninterrupted_run(data, tmp_path):
    """The fast one: the prior with data.resampled (its epoch is 32 steps), killed right after the step-16
    checkpoint file (before last.ckpt), right after the step-32 checkpoint at the epoch's end (before that step's row
    is logged), then, its last.ckpt truncated, once more from outside at a random moment."""
    straight, killed = commands("bart_prior", data, tmp_path, "data.resampled=true")
    run_train(straight)
    killed_run(killed, "step-file", 16)
    assert final_step(str(tmp_path / "killed")) == 16
    killed_run(killed, "saved", 32)
    assert final_step(str(tmp_path / "killed")) == 32
    assert not os.path.exists(tmp_path / "killed" / "export")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])  # a torn last.ckpt: the step-32 checkpoint is used instead
    _, err = killed_by_parent(killed, after=random.Random(0).uniform(0.2, 2.0))
    assert "last.ckpt is unreadable" in err and "step0000032.ckpt" in err, err[-3000:]
    run_train(killed)
    assert steps_logged(tmp_path / "killed") == list(range(STEPS))  # every step's row, once
    seen = assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"), "bart_prior")
    assert seen["losses"] == STEPS


def steps_logged(run_dir) -> list[int]:
    return [s for s, _ in logged(str(run_dir), "train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("component,extra", [
    ("bart_prior", ("data.resampled=false", "data.num_workers=2")),
    ("vqgan", ("data.resampled=true", "data.num_workers=2")),
    ("vqgan", ("data.resampled=false",)),
    ("clip", ("data.resampled=true", "loss.hard_negatives=1")),
    ("clip", ("data.resampled=false", "data.num_workers=2")),
], ids=["prior-epochs-2workers", "vqgan-resampled-2workers", "vqgan-epochs", "clip-resampled", "clip-epochs-2workers"])
def test_killed_run_ends_as_the_uninterrupted_run(component, extra, data, tmp_path):
    """Each stage in each data mode: killed right after a checkpoint, then mid-way between two (at the step after an
    epoch boundary where there is one before the end)."""
    straight, killed = commands(component, data, tmp_path, *extra)
    run_train(straight)
    killed_run(killed, "saved", EVERY)
    boundary = EPOCH[component] + 1 if EPOCH[component] + 1 < STEPS else STEPS - 5
    killed_run(killed, "step", boundary)
    assert final_step(str(tmp_path / "killed")) == (boundary // EVERY) * EVERY
    run_train(killed)
    assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"), component)


@pytest.mark.slow
def test_a_validation_due_at_the_checkpoint_step_is_the_one_thing_missing(data, tmp_path):
    """The bound in docs/training.md: killed right after the checkpoint of a step where a validation is due (before
    it ran), the resumed run does not run that validation again; everything else, training included, is exact."""
    straight, killed = commands("bart_prior", data, tmp_path, "data.resampled=true",
                                f"trainer.val_check_interval={EVERY}")
    run_train(straight)
    killed_run(killed, "saved", 2 * EVERY)
    run_train(killed)
    a, b = metric_rows(str(tmp_path / "straight")), metric_rows(str(tmp_path / "killed"))
    missing = [r for r in a if r not in b]
    assert missing and all(int(r["step"]) == 2 * EVERY - 1 and any(k.startswith("val/") for k in r)
                           for r in missing), missing
    assert [r for r in a if r not in missing] == b
    rows = [r for r in b if "train/loss" in r]
    assert len(rows) == STEPS


@pytest.mark.slow
def test_accumulated_run_resumed_at_an_epoch_end_ends_as_the_uninterrupted_run(data, tmp_path):
    """CLIP with 2 batches per update on the 13-batch epochs of data.resampled=false: killed right after the
    checkpoint at the epoch's last batch (optimizer step 7, half a group), the resumed run groups the next epoch's
    batches from its first, as the uninterrupted run does."""
    straight, killed = commands("clip", data, tmp_path, "data.resampled=false", "trainer.accumulate_grad_batches=2",
                                "trainer.max_steps=14", "trainer.checkpoint_every_n_steps=7",
                                "trainer.val_check_interval=28")
    run_train(straight)
    killed_run(killed, "saved", 7)
    run_train(killed)
    # one checkpoint per step: the resumed run does not save again at step 7, half-way through its next group
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["last.ckpt", "step0000007.ckpt",
                                                                        "step0000014.ckpt"]
    assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"), "clip")

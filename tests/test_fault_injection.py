"""Every writer of the project survives a crash mid-write and a full disk: the destination always holds the complete
previous version or the complete new one (never a partial one, loading or not), a failed write leaves no temporary
behind, and the next write completes by itself (tests/_fault_harness.py does the writing, killing and checking).

The table covers shard sets (`python -m data prepare`), code shards (`python -m vqgan.encode`), the three model
folders (save_pretrained), bundle assembly (`train.py bundle`), the end-of-run export of train.py, training
checkpoints, the two converters and the demo's report. Each writer is killed with SIGKILL at random moments
(seeded), made to hit a full disk (ENOSPC from Python's file writes after N bytes) and a file size limit (EFBIG from
the system, whatever writes: Rust writers such as safetensors and tokenizers too) at several N.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "tests", "_fault_harness.py")
WRITERS = ["shards", "code_shards", "vqgan_folder", "prior_folder", "clip_folder", "bundle", "export", "checkpoint",
           "vqgan_convert", "prior_convert", "report"]
# N as fractions of a full write's bytes (ENOSPC: all files together; EFBIG: the largest file)
FAST_SIZES = "0,0.002,0.3,0.8"
SLOW_SIZES = "0,0.0001,0.001,0.01,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.97,0.999"


def harness(writer: str, work: str, seed: int, kills: int, sizes: str) -> dict:
    res = subprocess.run([sys.executable, HARNESS, writer, work, str(seed), str(kills), sizes], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("writer", WRITERS)
def test_writer_leaves_old_or_new_after_kills_and_full_disks(writer, tmp_path):
    out = harness(writer, str(tmp_path), seed=0, kills=8, sizes=FAST_SIZES)
    assert out["problems"] == [], out
    assert len(out["seen"]) == 2 + 8 + 2 * 4 + 1


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_writer_leaves_old_or_new_after_many_kills_and_full_disks(writer, tmp_path):
    out = harness(writer, str(tmp_path), seed=1, kills=60, sizes=SLOW_SIZES)
    assert out["problems"] == [], out


def test_the_harness_catches_a_writer_that_writes_in_place(tmp_path):
    """A JSON file written in place: killed mid-write or out of space, it is left partial, and the harness says so
    (so the table above can fail)."""
    out = harness("naive_file", str(tmp_path), seed=0, kills=8, sizes=FAST_SIZES)
    assert any("unreadable" in p for p in out["problems"]), out


def test_min_dalle_export_is_one_version(tmp_path):
    """min-dalle's four files (encoder, decoder, vocabulary, merges) change together: a write that fails between the
    encoder and the decoder (EFBIG at half the largest file) leaves the previous four, and files of the folder that
    are not the prior's (the VQGAN's detoker.pt beside them) stay."""
    out = harness("prior_to_min_dalle", str(tmp_path), seed=0, kills=8, sizes=FAST_SIZES)
    assert out["problems"] == [], out

"""core.files: the one atomic writer (files and folders) and the one-line model-folder errors."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from core.errors import ModelFolderError
from core.files import (atomic_file, atomic_folder, atomic_update, check_safetensors, load_safetensors, load_state, read_json,
                        recover_folder, write_json)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_version(folder, version: int, files: int = 3) -> None:
    for i in range(files):
        with open(os.path.join(folder, f"part{i}.txt"), "w") as fh:
            fh.write(f"{version}\n" * 1000)


def _version(folder) -> int | None:
    """The version a folder holds when it is complete and consistent, else None."""
    names = sorted(os.listdir(folder))
    if names != ["part0.txt", "part1.txt", "part2.txt"]:
        return None
    found = {open(os.path.join(folder, n)).read() for n in names}
    return int(next(iter(found)).split()[0]) if len(found) == 1 and len(next(iter(found)).split()) == 1000 else None


def test_folder_is_created_replaced_and_left_whole_on_error(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(str(dest)) as tmp:
        assert os.path.isdir(tmp) and not dest.exists()  # nothing at the destination until the block ends
        _write_version(tmp, 1)
    assert _version(dest) == 1
    with atomic_folder(str(dest)) as tmp:
        _write_version(tmp, 2)
        assert _version(dest) == 1  # the old folder stays in place while the new one is written
    assert _version(dest) == 2
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(str(dest)) as tmp:
            _write_version(tmp, 3, files=1)
            raise RuntimeError("disk full")
    assert _version(dest) == 2 and sorted(os.listdir(tmp_path)) == ["model"]


def test_a_writer_killed_between_two_renames_is_recovered(tmp_path):
    # where folders cannot be exchanged in one step the old one is set aside first: simulate a kill right there
    dest, old = tmp_path / "model", tmp_path / ".model.old"
    os.makedirs(old)
    _write_version(str(old), 1)
    os.makedirs(tmp_path / ".model.tmp-abc")  # an abandoned temporary folder
    recover_folder(str(dest))
    assert _version(dest) == 1 and sorted(os.listdir(tmp_path)) == ["model"]


def test_file_is_replaced_in_one_step(tmp_path):
    path = tmp_path / "report.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(OSError):
        with atomic_file(str(path)) as fh:
            fh.write('{"a": ')
            raise OSError("No space left on device")
    assert read_json(str(path)) == {"a": 1} and os.listdir(tmp_path) == ["report.json"]


_WRITER = """
import sys, time
from core.files import atomic_folder
dest, version = sys.argv[1], int(sys.argv[2])
with atomic_folder(dest) as tmp:
    for i in range(3):
        with open(f"{tmp}/part{i}.txt", "w") as fh:
            for _ in range(1000):
                fh.write(f"{version}\\n")
        time.sleep(0.01)
print("done", flush=True)
"""


def test_killed_writers_leave_the_old_or_the_new_folder(tmp_path):
    dest = str(tmp_path / "model")
    subprocess.run([sys.executable, "-c", _WRITER, dest, "0"], cwd=REPO, check=True)
    rng = random.Random(0)
    newest = 0
    for version in range(1, 16):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, dest, str(version)], cwd=REPO,
                                stdout=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        finished = b"done" in proc.communicate()[0]
        recover_folder(dest)  # what the next writer does first
        found = _version(dest)
        assert found in (newest, version), (version, found)
        assert not finished or found == version
        newest = found
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_model_folder_errors_are_one_line_and_name_the_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    assert torch.equal(load_safetensors(str(weights))["w"], torch.zeros(64, 64))
    weights.write_bytes(weights.read_bytes()[:1000])
    for read in (load_safetensors, check_safetensors):
        with pytest.raises(ModelFolderError, match=f"{weights}: cannot read the weights .*truncated") as err:
            read(str(weights))
        assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="config.json: not valid JSON"):
        read_json(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFolderError, match="expected a JSON object, found list"):
        read_json(str(tmp_path / "config.json"))
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ModelFolderError, match=r"src: tensor 'weight' has shape \(3, 5\), the model expects \(3, 4\)"):
        load_state(model, {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, "src")
    with pytest.raises(ModelFolderError, match="src: missing tensor 'bias'"):
        load_state(model, {"weight": torch.zeros(3, 4)}, "src")
    with pytest.raises(ModelFolderError, match="src: unexpected tensor 'extra'"):
        load_state(model, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "extra": torch.zeros(1)}, "src")


def test_atomic_update_replaces_its_files_together_and_keeps_the_others(tmp_path):
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "a.pt").write_text("a1")
    (dest / "b.pt").write_text("b1")
    (dest / "detoker.pt").write_text("vqgan")
    (dest / "sub").mkdir()
    (dest / "sub" / "x").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_update(str(dest), ["a.pt", "b.pt"]) as tmp:
            open(os.path.join(tmp, "a.pt"), "w").write("a2")
            raise RuntimeError("the disk filled before b.pt")
    assert (dest / "a.pt").read_text() == "a1" and (dest / "b.pt").read_text() == "b1"
    with atomic_update(str(dest), ["a.pt", "b.pt"]) as tmp:
        for name in ("a.pt", "b.pt"):
            open(os.path.join(tmp, name), "w").write(name[0] + "2")
    assert sorted(os.listdir(dest)) == ["a.pt", "b.pt", "detoker.pt", "sub"]
    assert [(dest / n).read_text() for n in ("a.pt", "b.pt", "detoker.pt")] == ["a2", "b2", "vqgan"]
    assert (dest / "sub" / "x").read_text() == "x"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left

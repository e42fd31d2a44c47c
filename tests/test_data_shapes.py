"""The shapes benchmark: deterministic preparation, held-out split, the oracle, and the CLI."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data import DataError, iter_samples
from data.cli import main
from data.oracle import evaluate, predict, score
from data.shapes import ShapeSpec, all_combinations, heldout_combinations, parse_caption, render, val_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metas(split_dir: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(split_dir)):
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes") / "set")
    assert main(["prepare", "shapes", "--out", out, "--num-samples", "240", "--shard-size", "50"]) == 0
    return out


def test_prepare_shapes_layout_and_determinism(shapes_dir, tmp_path):
    manifest = json.load(open(os.path.join(shapes_dir, "manifest.json")))
    assert manifest["counts"] == {"train": 216, "val": 24, "val_heldout": 12}
    assert not os.path.exists(os.path.join(shapes_dir, ".prepare.json"))
    assert sorted(os.listdir(os.path.join(shapes_dir, "train"))) == [f"{i:06d}.tar" for i in range(5)]
    again = str(tmp_path / "again")
    main(["prepare", "shapes", "--out", again, "--num-samples", "240", "--shard-size", "50"])
    for rel in ("manifest.json", "train/000000.tar", "train/000004.tar", "val/000000.tar"):
        assert open(os.path.join(shapes_dir, rel), "rb").read() == open(os.path.join(again, rel), "rb").read()
    # rerun: finished shards are kept as they are, a missing one is rewritten identically, leftovers ignored
    victim = os.path.join(again, "train", "000002.tar")
    before = open(victim, "rb").read()
    os.remove(victim)
    open(os.path.join(again, "train", ".000003.tar.x1y2.tmp"), "wb").write(b"half")
    stamp = os.stat(os.path.join(again, "train", "000000.tar")).st_mtime_ns
    main(["prepare", "shapes", "--out", again, "--num-samples", "240", "--shard-size", "50"])
    assert open(victim, "rb").read() == before
    assert os.stat(os.path.join(again, "train", "000000.tar")).st_mtime_ns == stamp
    assert main(["prepare", "shapes", "--out", again, "--num-samples", "300", "--shard-size", "50"]) == 2


def test_heldout_combinations_only_in_val(shapes_dir):
    held = {tuple(c) for c in json.load(open(os.path.join(shapes_dir, "manifest.json")))["heldout"]}
    assert held == set(heldout_combinations()) and len(held) == round(0.1 * len(all_combinations()))
    combo = lambda m: (m["shape"], m["color"], m["size"], m["position"], m["background"])  # noqa: E731
    train, val = _metas(os.path.join(shapes_dir, "train")), _metas(os.path.join(shapes_dir, "val"))
    assert len(train) == 216 and not any(combo(m) in held for m in train)
    assert sum(combo(m) in held for m in val) == 12 and all((combo(m) in held) == m["heldout"] for m in val)
    samples = list(iter_samples(os.path.join(shapes_dir, "val", "*.tar"), image_size=64))
    assert all(score(s["caption"], s["image"])["all"] for s in samples)  # float [-1, 1] tensors


def test_oracle_reads_renders_and_rejects_shuffled_captions():
    combos = all_combinations()
    rng = np.random.default_rng(0)
    captions, images = [], []
    for i in range(600):
        spec = ShapeSpec(*combos[int(rng.integers(len(combos)))])
        captions.append(spec.caption())
        images.append(render(spec, 64, np.random.default_rng(i)))
    assert evaluate(captions, images)["all"] >= 0.99
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    chance = evaluate(shuffled, images)
    assert chance["all"] < 0.02 and chance["shape"] < 0.35 and chance["color"] < 0.2 and chance["size"] < 0.6
    # blurred like a reconstruction, as PIL / uint8 tensors / other resolutions
    blurred = [Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8)) for im in images[:100]]
    assert evaluate(captions[:100], blurred)["all"] >= 0.97
    assert score(captions[0], torch.from_numpy(images[0]).permute(2, 0, 1))["all"]
    spec = ShapeSpec("triangle", "orange", "small", "top right", "yellow")
    assert predict(render(spec, 128)) == {"shape": "triangle", "color": "orange", "size": "small",
                                          "position": "top right", "background": "yellow"}


def test_captions_parse_and_prompts():
    spec = parse_caption("a small red circle in the top left on a blue background")
    assert spec == ShapeSpec("circle", "red", "small", "top left", "blue")
    assert parse_caption(spec.caption()) == spec
    for bad in ("a small red circle", "a huge red circle in the top left on a blue background",
                "a small red circle in the top left on a red background"):
        with pytest.raises(DataError):
            parse_caption(bad)
    prompts = val_prompts(None, n_seen=4, n_heldout=3)
    held = set(heldout_combinations())
    assert [p["heldout"] for p in prompts] == [False] * 4 + [True] * 3
    assert all((parse_caption(p["caption"]).combo in held) == p["heldout"] for p in prompts)


def test_inspect_json_and_exit_codes(shapes_dir, capsys, tmp_path):
    assert main(["inspect", os.path.join(shapes_dir, "train", "{000000..000004}.tar")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 5 and report["samples"] == 216 and report["unique_keys"] == 216
    assert report["extensions"] == {"json": 216, "png": 216, "txt": 216} and report["corrupt_samples"] == 0
    proc = subprocess.run([sys.executable, "-m", "data", "inspect", str(tmp_path / "none-*.tar")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def _image(path: str, rgb, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (12, 10), rgb).save(path, format=fmt)


def test_prepare_folder_with_txt_and_csv(tmp_path, capsys):
    src = tmp_path / "src"
    _image(str(src / "a.png"), (255, 0, 0), "PNG")
    _image(str(src / "sub" / "b.jpg"), (0, 0, 255), "JPEG")
    _image(str(src / "c.bmp"), (0, 255, 0), "BMP")
    (src / "d.png").write_bytes(b"not an image")
    for stem, text in (("a", "red thing"), ("sub/b", "blue thing"), ("c", "green thing"), ("d", "broken")):
        (src / f"{stem}.txt").write_text(text + "\n")
    _image(str(src / "nocaption.png"), (1, 2, 3), "PNG")
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "txt"), "--shard-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3 and summary["images_without_caption"] == 1 and summary["unreadable_images"] == ["d.png"]
    got = {s["caption"]: s["image"][:, 4, 4] for s in iter_samples(str(tmp_path / "txt" / "*.tar"), image_size=8)}
    assert set(got) == {"red thing", "blue thing", "green thing"}
    assert got["green thing"].argmax() == 1 and got["blue thing"].argmax() == 2
    (tmp_path / "caps.csv").write_text("path,caption\na.png,\"a red, square image\"\nsub/b.jpg,a blue one\n")
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "csv"),
                 "--captions", str(tmp_path / "caps.csv")]) == 0
    capsys.readouterr()
    assert sorted(s["caption"] for s in iter_samples(str(tmp_path / "csv" / "*.tar"))) == [
        "a blue one", "a red, square image"]
    (tmp_path / "caps.jsonl").write_text(json.dumps({"path": "c.bmp", "caption": "green"}) + "\n")
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "jsonl"),
                 "--captions", str(tmp_path / "caps.jsonl")]) == 0
    assert [s["caption"] for s in iter_samples(str(tmp_path / "jsonl" / "*.tar"))] == ["green"]

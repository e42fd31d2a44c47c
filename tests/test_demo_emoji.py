"""`python -m demo emoji`: a folder of captioned images through every stage to labelled grids and a report, on a tiny
font-free fixture (a few generated PNG files with .txt captions, as a user's own folder; the Noto emoji set needs
the Debian font and takes long). A rerun reuses every finished stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def write_fixture(root: str, size: int = 32) -> dict[str, int]:
    """root/train and root/val: a coloured shape on white per PNG, its caption in a same-stem .txt file."""
    items = [(c, s, big) for c in COLOURS for s in SHAPES for big in (False, True)]  # 24 captions
    counts = {"train": 0, "val": 0}
    for i, (colour, shape, big) in enumerate(items):
        split = "val" if i % 4 == 3 else "train"
        os.makedirs(os.path.join(root, split), exist_ok=True)
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        m = 4 if big else 10
        box = (m, m, size - m, size - m)
        {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, lambda b, fill: draw.polygon(
            [(size // 2, m), (m, size - m), (size - m, size - m)], fill=fill))(box, fill=COLOURS[colour])
        stem = os.path.join(root, split, f"{i:03d}")
        image.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as fh:
            fh.write(f"a {'big' if big else 'small'} {colour} {shape}\n")
        counts[split] += 1
    return counts


def test_recipe_end_to_end_on_a_folder_of_images_and_rerun(tmp_path):
    images, out = tmp_path / "images", tmp_path / "run"
    counts = write_fixture(str(images))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "demo", "emoji", "--preset", "tiny", "--images", str(images), "--out", str(out),
           "--prompts", "a purple hexagon", "a big red circle"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the user's commands, in order; the folder is read by `prepare folder`, as anyone's would be
    printed = res.stdout
    order = ["-m data prepare folder", "train.py vqgan", "-m vqgan.encode", "-m bart_prior.tokenizer",
             "train.py bundle", "generate.py --bundle"]
    at = [printed.index(c) for c in order]
    assert at == sorted(at), at
    assert "prepare emoji" not in printed  # --images: no rendering step
    for path in ("shards/train", "shards/val", "vqgan/export", "codes/val/.done", "tokenizer/tokenizer.json",
                 "bart_prior/export", "clip_rank/export", "bundle/bundle.json", "samples/val/grid.png",
                 "samples/val/results.json", "report/report.json", "report/report.md"):
        assert (out / path).exists(), path
    report = json.load(open(out / "report" / "report.json"))
    assert report["counts"] == counts and report["images"] == 24
    v = report["vqgan"]
    assert v["images"] == counts["val"] and v["psnr"] > 0 and -1 <= v["ssim"] <= 1
    assert 0 < v["codebook_usage"] <= 1 and v["codes_used"] >= 1
    assert (v["lpips"] is None) == (v["lpips_missing"] is not None)
    assert report["prior"]["val/loss"] is not None and report["prior"]["val/caption_gain"] is not None
    c = report["clip"]
    assert c["items"] == counts["val"] and 0 <= c["t2i_R@1"] <= 1 and c["chance"] == pytest.approx(1 / counts["val"])
    # the val grid's prompts are val captions; "a big red circle" is a caption of the set, so only the new one is kept
    val_captions = {open(images / "val" / f, encoding="utf-8").read().strip()
                    for f in os.listdir(images / "val") if f.endswith(".txt")}
    assert len(report["samples"]["val"]["prompts"]) == 2 and set(report["samples"]["val"]["prompts"]) <= val_captions
    assert report["samples"]["new"]["prompts"] == ["a purple hexagon"]
    results = json.load(open(out / "samples" / "new" / "results.json"))["results"]
    assert [r["file"] for r in results] == ["000_00.png", "000_01.png"]
    grid = Image.open(out / "samples" / "val" / "grid.png")
    assert grid.size[0] > 2 * 34 + 2 and grid.size[1] > 2 * 34 + 2  # labelled: wider and taller than bare
    md = (out / "report" / "report.md").read_text()
    assert "![val grid](../samples/val/grid.png)" in md and "![new grid](../samples/new/grid.png)" in md
    assert "recall@1" in md and "codebook usage" in md and "caption gain" in md and "PSNR" in md
    assert ("LPIPS (VGG) | n/a (" in md) == (v["lpips"] is None)

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("done already") == 8  # shards, 5 training stages, bundle, generate


def test_minutes_become_caps_and_a_deadline():
    from demo.emoji import RECIPES, training_caps

    full = RECIPES["full"]
    caps = training_caps(full, 60, sequential=False)
    assert caps == {"vqgan": 16.2, "bart_prior": 37.8, "clip_rank": 37.8}  # shares of 60 - 6 reserved minutes
    assert sum(training_caps(full, 60, sequential=True).values()) == pytest.approx(54)
    assert training_caps(full, 0, sequential=False) == {}


def test_bad_options_are_one_line(tmp_path, capsys):
    from demo.emoji import main

    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "must hold train/ and val/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--minutes", "3", "--out", str(tmp_path / "o")])
    assert "--minutes must be 0 or more than" in capsys.readouterr().err

"""The Noto emoji set: rendering, shards, split, errors. Runs without the emoji font or the ``emoji`` package: the
renderer takes any TrueType font (DejaVuSans, or Pillow's built-in Aileron when DejaVu is not installed) and a
small name table."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import ImageFont

from data import DataConfig, DataError, ShardDataModule, iter_samples
from data import emoji as emoji_set
from data.cli import main
from data.prepare import inspect_shards, prepare_emoji

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NAMES = {c: f"glyph {c}" for c in "ABCDEFGHKMNPRSTUVXYZ2345678"}  # 27 glyphs every test font has
NAMES.update({" ": "space", "WWWWWW": "six double-u"})  # blank; several glyphs side by side


@pytest.fixture(scope="module")
def font_path(tmp_path_factory) -> str:
    """DejaVuSans if installed, else Pillow's built-in Aileron written to a file (fresh CI machines have no fonts)."""
    if os.path.isfile(DEJAVU):
        return DEJAVU
    grabbed = {}
    real = ImageFont.truetype

    def grab(font, *args, **kwargs):
        grabbed["bytes"] = font.getvalue()
        return real(font, *args, **kwargs)

    ImageFont.truetype = grab
    try:
        ImageFont.load_default(size=20)
    finally:
        ImageFont.truetype = real
    path = tmp_path_factory.mktemp("font") / "builtin.ttf"
    path.write_bytes(grabbed["bytes"])
    return str(path)


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory, font_path) -> str:
    out = str(tmp_path_factory.mktemp("emoji") / "set")
    prepare_emoji(out, resolution=32, val_fraction=0.2, shard_size=10, font=font_path, font_size=40, names=NAMES)
    return out


def test_captions_from_emoji_names():
    assert emoji_set.caption_of(":AB_button_(blood_type):") == "AB button (blood type)"
    assert emoji_set.caption_of(":man_climbing_medium_skin_tone:") == "man climbing medium skin tone"


def test_render_centres_glyph_on_white(font_path):
    font = emoji_set.load_font(font_path, 40)
    image, reason = emoji_set.render("H", font, 32)
    assert reason == "" and image.size == (32, 32) and image.mode == "RGB"
    a = np.asarray(image).astype(int)
    assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()  # white background
    ys, xs = np.nonzero(a.min(axis=2) < 128)  # dark ink
    assert len(xs) > 10
    assert abs((xs.min() + xs.max()) / 2 - 15.5) <= 1.5 and abs((ys.min() + ys.max()) / 2 - 15.5) <= 1.5
    assert emoji_set.render(" ", font, 32) == (None, "blank")
    assert emoji_set.render("WWWWWW", font, 32) == (None, "not_single_glyph")


@pytest.mark.skipif(not os.path.isfile(DEJAVU), reason="DejaVuSans not installed")
def test_render_symbols_with_dejavu():
    font = emoji_set.load_font(DEJAVU, 48)
    for symbol in "☺★♥":
        image, reason = emoji_set.render(symbol, font, 64)
        assert reason == "" and np.asarray(image).min() < 64


def test_prepare_writes_split_shards_and_manifest(emoji_dir, font_path, tmp_path):
    manifest = json.load(open(os.path.join(emoji_dir, "manifest.json")))
    assert manifest["candidates"] == 29
    assert manifest["counts"] == {"train": 22, "val": 5}  # 27 rendered, 20% (rounded) in val
    assert manifest["skipped"] == {"blank": 1, "not_single_glyph": 1}
    assert manifest["skipped_names"] == {"blank": ["space"], "not_single_glyph": ["six double-u"]}
    assert manifest["splits"] == {"train": "train/{000000..000002}.tar", "val": "val/000000.tar"}
    assert not os.path.exists(os.path.join(emoji_dir, ".prepare.json"))
    captions = {}
    for split in ("train", "val"):
        report = inspect_shards(os.path.join(emoji_dir, manifest["splits"][split]))
        n = manifest["counts"][split]
        assert report["samples"] == report["unique_keys"] == n
        assert report["without_caption"] == 0 and report["corrupt_samples"] == 0
        assert report["sizes"] == {"32x32": n} and report["extensions"] == {"json": n, "png": n, "txt": n}
        captions[split] = [s["caption"] for s in iter_samples(os.path.join(emoji_dir, split, "*.tar"), image_size=32)]
    assert not set(captions["train"]) & set(captions["val"])
    assert sorted(captions["train"] + captions["val"]) == sorted(f"glyph {c}" for c in "ABCDEFGHKMNPRSTUVXYZ2345678")
    # same seed: same bytes; another seed: another split; other settings in the same folder: refused
    again = str(tmp_path / "again")
    prepare_emoji(again, resolution=32, val_fraction=0.2, shard_size=10, font=font_path, font_size=40, names=NAMES)
    for rel in ("manifest.json", "train/000000.tar", "train/000002.tar", "val/000000.tar"):
        assert open(os.path.join(emoji_dir, rel), "rb").read() == open(os.path.join(again, rel), "rb").read()
    other = prepare_emoji(str(tmp_path / "seed1"), resolution=32, val_fraction=0.2, shard_size=10, font=font_path,
                          font_size=40, names=NAMES, seed=1)
    assert other["counts"] == manifest["counts"]
    assert open(os.path.join(emoji_dir, "val/000000.tar"), "rb").read() != \
        open(str(tmp_path / "seed1" / "val" / "000000.tar"), "rb").read()
    with pytest.raises(DataError, match="other settings"):
        prepare_emoji(again, resolution=32, val_fraction=0.2, shard_size=10, font=font_path, font_size=40,
                      names=NAMES, seed=1)


def test_shards_read_back_through_the_data_module(emoji_dir):
    cfg = DataConfig(train=os.path.join(emoji_dir, "train", "*.tar"), val=os.path.join(emoji_dir, "val", "*.tar"),
                     image_size=32, batch_size=4, shuffle_buffer=8, num_workers=0)
    dm = ShardDataModule(cfg)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and all(c.startswith("glyph ") for c in batch["caption"])
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    val = [b for b in dm.val_dataloader()]
    assert sum(len(b["caption"]) for b in val) == 5
    assert float(val[0]["image"][:, :, 0, 0].min()) == 1.0  # white corners


def test_missing_font_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "NotoColorEmoji.ttf")
    monkeypatch.setattr(emoji_set, "DEFAULT_FONT", missing)
    with pytest.raises(DataError, match=r"apt-get install fonts-noto-color-emoji"):
        prepare_emoji(str(tmp_path / "out"), names=NAMES)
    assert main(["prepare", "emoji", "--out", str(tmp_path / "out"), "--font", str(tmp_path / "nope.ttf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "font not found" in err and "apt-get install fonts-noto-color-emoji" in err
    assert not os.path.exists(tmp_path / "out")


def test_missing_emoji_package_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch, font_path):
    monkeypatch.setitem(sys.modules, "emoji", None)  # import emoji -> ImportError
    with pytest.raises(DataError, match=r"pip install -e \.\[emoji\]"):
        emoji_set.emoji_names()
    assert main(["prepare", "emoji", "--out", str(tmp_path / "out"), "--font", font_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e .[emoji]" in err


def test_cli_validates_options(tmp_path, capsys, font_path):
    assert main(["prepare", "emoji", "--out", str(tmp_path), "--font", font_path, "--val-fraction", "1.5"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(emoji_set.DEFAULT_FONT), reason="fonts-noto-color-emoji not installed")
def test_real_noto_emoji_render_in_colour():
    font = emoji_set.load_font()
    for text in ("😀", "🇫🇷", "👍🏽"):
        image, reason = emoji_set.render(text, font, 64)
        assert reason == "", text
        a = np.asarray(image).astype(int)
        assert (a[0, 0] == 255).all() and np.abs(a[..., 0] - a[..., 2]).max() > 60, text  # coloured, white corner
    with pytest.raises(DataError, match="only has size 109"):
        emoji_set.load_font(size=64)


def test_as_folder_writes_what_prepare_folder_reads_with_the_same_split(emoji_dir, font_path, tmp_path, capsys):
    """--as-folder: the same images and split as the shards, as STEM.png + STEM.txt per split, which `prepare folder`
    turns into shards like any user's folder; a rerun finds it done, other settings are refused."""
    from data.prepare import prepare_emoji_folder, prepare_folder

    out = str(tmp_path / "folder")
    m = prepare_emoji_folder(out, resolution=32, val_fraction=0.2, font=font_path, font_size=40, names=NAMES)
    assert m["counts"] == {"train": 22, "val": 5} and m["skipped"] == {"blank": 1, "not_single_glyph": 1}
    stems = []
    for split in ("train", "val"):
        files = sorted(os.listdir(os.path.join(out, split)))
        assert len(files) == 2 * m["counts"][split]
        stems += [f[:-4] for f in files if f.endswith(".png")]
        assert {f[:-4] for f in files if f.endswith(".txt")} == {f[:-4] for f in files if f.endswith(".png")}
        summary = prepare_folder(os.path.join(out, split), str(tmp_path / "shards" / split))
        assert summary["samples"] == m["counts"][split]
        folder = sorted(s["caption"] for s in iter_samples(str(tmp_path / "shards" / split / "*.tar"), image_size=32))
        shards = sorted(s["caption"] for s in iter_samples(os.path.join(emoji_dir, split, "*.tar"), image_size=32))
        assert folder == shards  # the same seed splits the same emoji into val
    assert sorted(stems) == sorted(f"{ord(c):04X}" for c in "ABCDEFGHKMNPRSTUVXYZ2345678")  # code points
    caption = open(os.path.join(out, "val", stems[-1] + ".txt"), encoding="utf-8").read()
    assert caption == f"glyph {chr(int(stems[-1], 16))}\n"
    assert prepare_emoji_folder(out, resolution=32, val_fraction=0.2, font=font_path, font_size=40, names=NAMES) == m
    with pytest.raises(DataError, match="other settings"):
        prepare_emoji_folder(out, resolution=32, val_fraction=0.2, font=font_path, font_size=40, names=NAMES, seed=3)
    assert emoji_set.file_stem("👍🏽") == "1F44D-1F3FD"
    # the command line: the font is checked first, in one line
    assert main(["prepare", "emoji", "--as-folder", "--out", str(tmp_path / "x"), "--font",
                 str(tmp_path / "nope.ttf")]) == 2
    assert "font not found" in capsys.readouterr().err

"""Shard I/O: patterns, atomic writing, round-trips, corrupt samples, image mode conversion."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, ShardWriter, complete_shards, count_samples, expand_pattern, iter_samples, load_image
from _data_helpers import colour, pattern, png, write_set


def test_expand_pattern_forms(tmp_path):
    write_set(str(tmp_path), 3, 2)
    names = [str(tmp_path / f"{i:06d}.tar") for i in range(3)]
    assert expand_pattern(pattern(str(tmp_path), 3)) == names
    assert expand_pattern(str(tmp_path / "*.tar")) == names
    assert expand_pattern(f"{names[2]}::{names[0]}") == [names[2], names[0]]
    assert expand_pattern("pipe:cat a/{0..1}.tar") == ["pipe:cat a/0.tar", "pipe:cat a/1.tar"]
    for bad in (str(tmp_path / "nope/*.tar"), str(tmp_path / "{000000..000005}.tar"), ""):
        with pytest.raises(DataError) as err:
            expand_pattern(bad)
        assert "\n" not in str(err.value)


def test_writer_is_atomic_and_resumable(tmp_path):
    writer = ShardWriter(str(tmp_path), shard_size=2)
    writer.write({"__key__": "a", "txt": "x", "png": png((1, 2, 3))})
    assert complete_shards(str(tmp_path)) == [] and len(os.listdir(tmp_path)) == 1  # unfinished: never valid
    writer.write({"__key__": "b", "txt": "y", "png": png((1, 2, 3))})
    writer.write({"__key__": "c", "txt": "z", "png": png((1, 2, 3))})
    assert complete_shards(str(tmp_path)) == [0]
    writer.close()
    assert complete_shards(str(tmp_path)) == [0, 1]
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), shard_size=5, start_index=2) as w:
            w.write({"__key__": "d", "txt": "w"})
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["000000.tar", "000001.tar"]
    with pytest.raises(DataError):
        ShardWriter(str(tmp_path)).write({"__key__": "bad.key", "txt": "x"})


def test_round_trip_images_and_codes(tmp_path):
    keys = write_set(str(tmp_path / "img"), 2, 3)
    out = list(iter_samples(pattern(str(tmp_path / "img"), 2), mode="images", image_size=8))
    assert [s["key"] for s in out] == keys
    assert [s["caption"] for s in out] == [f"caption {i}" for i in range(6)]
    for i, s in enumerate(out):
        assert s["image"].shape == (3, 8, 8) and s["image"].dtype == torch.float32
        want = torch.tensor(colour(i), dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(s["image"][:, 4, 4], want)
    write_set(str(tmp_path / "codes"), 1, 4, codes=True)
    out = list(iter_samples(str(tmp_path / "codes/*.tar"), mode="codes"))
    assert [int(s["codes"][1, 2]) for s in out] == [0, 1, 2, 3]
    assert out[0]["codes"].dtype == torch.long and out[0]["codes"].shape == (2, 3)
    assert count_samples(expand_pattern(str(tmp_path / "img/*.tar"))) == 6
    # the same samples give the same bytes
    write_set(str(tmp_path / "again"), 2, 3)
    assert (tmp_path / "img/000001.tar").read_bytes() == (tmp_path / "again/000001.tar").read_bytes()


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    with ShardWriter(str(tmp_path), shard_size=4) as w:
        w.write({"__key__": "good0", "txt": "ok", "png": png((10, 20, 30))})
        w.write({"__key__": "badimg", "txt": "broken", "png": b"\x89PNG not really"})
        w.write({"__key__": "nocap", "png": png((10, 20, 30))})
        w.write({"__key__": "noimg", "txt": "caption only"})
        for i in range(8):  # shard 1: cut short in the middle of a member below
            w.write({"__key__": f"t{i}", "txt": f"t {i}", "png": png(colour(i), 32)})
    shard = tmp_path / "000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(iter_samples(str(tmp_path / "*.tar"), image_size=8))
    keys = [s["key"] for s in out]
    assert keys[0] == "good0" and "badimg" not in keys and "nocap" not in keys and "noimg" not in keys
    assert 1 <= len([k for k in keys if k.startswith("t")]) < 8
    kinds = sorted({str(w.message).split("(")[1].split(")")[0] for w in caught if "skipping" in str(w.message)})
    assert kinds == ["caption", "image", "missing", "truncated"]  # one warning per kind


@pytest.mark.parametrize("mode,make,want", [
    ("L", lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
    ("P", lambda: Image.new("RGB", (4, 4), (200, 30, 60)).quantize(4), (200, 30, 60)),
    ("RGBA-transparent", lambda: Image.new("RGBA", (4, 4), (0, 0, 255, 0)), (255, 255, 255)),
    ("RGBA-half", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),
    ("LA", lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
])
def test_image_modes_become_rgb(mode, make, want):
    img = make()
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode == "CMYK" else "PNG")
    rgb = load_image(buf.getvalue())
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[2, 2].astype(int) - np.array(want)).max() <= 1


def test_resize_shorter_side_and_center_crop(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 4, 20))  # a blue strip on the left, cropped away by a center crop
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with ShardWriter(str(tmp_path), shard_size=10) as w:
        w.write({"__key__": "wide", "txt": "x", "png": buf.getvalue()})
    (s,) = list(iter_samples(str(tmp_path / "*.tar"), image_size=10))
    assert s["image"].shape == (3, 10, 10)
    assert torch.allclose(s["image"][:, 5, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)


@pytest.mark.parametrize("cut", ["header", "data", "end_blocks"])
def test_truncated_shard_counted_once(tmp_path, cut):
    write_set(str(tmp_path), 1, 6, size=16)
    shard = tmp_path / "000000.tar"
    data = shard.read_bytes()
    # every sample is 2 members of 512-byte header + 512-byte data block
    offset = {"header": 4 * 1024 + 100, "data": 4 * 1024 + 600, "end_blocks": 6 * 2048}[cut]
    shard.write_bytes(data[:offset])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [s["key"] for s in iter_samples(str(shard), image_size=8)]
    assert keys == ["s00000", "s00001"] if cut != "end_blocks" else len(keys) == 6  # whole samples are kept
    assert sum("(truncated)" in str(w.message) for w in caught) == 1


def test_pipe_urls(tmp_path):
    keys = write_set(str(tmp_path), 2, 2)
    got = [s["key"] for s in iter_samples(f"pipe:cat {tmp_path}/{{000000..000001}}.tar", image_size=8)]
    assert got == keys

"""Converted parts make a bundle and generate: a prior converted from min-dalle's files, a VQGAN in dalle-mini's
[0, 1] pixel convention and an open_clip checkpoint file (as OpenAI's ViT-B/32 weights come), through
`train.py bundle --clip-arch` and `generate.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from PIL import Image

from _launch_helpers import REPO, env
from _min_dalle_helpers import CODES, HEADS, md_state, reference, write_bpe

CLIP_ARCH = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                            "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_converted_parts_bundle_and_generate(tmp_path):
    from bart_prior.convert import main as convert
    from clip_rank import build_clip
    from vqgan import VQGAN, preset

    source = str(tmp_path / "min-dalle")
    write_bpe(source, "vocab_mini.json", "merges_mini.txt")
    enc, dec = reference(len(json.load(open(os.path.join(source, "vocab_mini.json")))) - 1, CODES, seed=4)
    torch.save(md_state(enc, keep_ones=False), os.path.join(source, "encoder_mini.pt"))
    torch.save(md_state(dec, keep_ones=False), os.path.join(source, "decoder_mini.pt"))
    prior = str(tmp_path / "prior")
    assert convert(["--from", "min-dalle", source, "--heads", str(HEADS), "--out", prior]) == 0
    # 16384 codes on a 16x16 grid, as the published VQGAN (at 64 px here), in dalle-mini's [0, 1] convention
    torch.manual_seed(0)
    VQGAN(preset("tiny", resolution=64, num_codes=CODES, pixel_range="0,1")).save_pretrained(str(tmp_path / "vqgan"))
    clip_file, arch_file = str(tmp_path / "clip.pt"), str(tmp_path / "clip_arch.json")
    torch.save(build_clip(arch=CLIP_ARCH).clip.state_dict(), clip_file)
    json.dump(CLIP_ARCH, open(arch_file, "w"))

    bundle, out = str(tmp_path / "bundle"), tmp_path / "out"
    parts = ["--vqgan", str(tmp_path / "vqgan"), "--bart-prior", prior, "--clip-rank", clip_file]
    res = subprocess.run([sys.executable, "train.py", "bundle", *parts, "--out", bundle], cwd=REPO, env=env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--clip-arch" in res.stderr
    res = subprocess.run([sys.executable, "train.py", "bundle", *parts, "--clip-arch", arch_file, "--out", bundle],
                         cwd=REPO, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(bundle, "clip_rank"))) == ["open_clip_config.json",
                                                                     "open_clip_model.safetensors"]
    res = subprocess.run([sys.executable, "generate.py", "--bundle", bundle, "an avocado armchair", "--candidates",
                          "2", "--keep", "1", "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.load(open(out / "results.json"))
    assert saved["settings"]["condition_scale"] == 10.0  # a converted prior guides as dalle-mini's demo does
    assert Image.open(out / "000_00.png").size == (64, 64) and saved["results"][0]["clip_score"] is not None

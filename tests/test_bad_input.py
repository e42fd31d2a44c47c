"""Bad input at every entry point, as a new user would give it: each case is a one-line error naming the file, key or
prompt with exit status 2, or, for a bad sample in a data set, a counted skip; never a traceback from inside a library.

The entry points run in this process (their ``main`` returns the exit status and prints to stderr) except where the
real process matters (exit status, no traceback, no hang): those run as subprocesses with a timeout."""
from __future__ import annotations

import ast
import csv
import glob
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from _bart_prior_helpers import write_code_shards
from _launch_helpers import CONFIG, REPO, env
from data import ShardWriter

STAGES = ("vqgan", "bart_prior", "clip")
NON_UTF8 = b"caf\xe9 au lait"  # Latin-1, as an old caption file may be
UNICODE_CAPTIONS = ["ein grünes Quadrat ✓", "一个红色的圆形", "دائرة حمراء على اليسار", "😀🎉🦄",
                    "e\u0301 combining, zero\u200bwidth, \U0001f469\u200d\U0001f52c joined"]


# ---- fixtures -----------------------------------------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A PNG whose header claims side x side 1-bit pixels: the header is all PIL reads before refusing it."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def image_members() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes): the image kinds a scraped folder holds. Good ones first, then the unusable."""
    rgb = Image.new("RGB", (40, 32), (200, 30, 60))
    buf = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(buf, format="JPEG")
    return {
        "rgb": ("png", _png(rgb)),
        "gray": ("png", _png(Image.new("L", (32, 32), 100))),
        "cmyk": ("jpg", buf.getvalue()),
        "i16": ("png", _png(Image.fromarray(np.full((32, 32), 40000, np.uint16)))),
        "empty": ("png", b""),  # a zero-byte file
        "bomb": ("png", bomb_png(20000)),  # 400M pixels, over twice PIL's limit: PIL refuses it itself
        "big": ("png", bomb_png(9500)),  # 90M pixels, just over PIL's limit, where PIL only warns
    }


GOOD_IMAGES = ("rgb", "gray", "cmyk", "i16")
BAD_IMAGES = ("big", "bomb", "empty")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def append_samples(shard: str, extra: list[dict]) -> None:
    """Rewrite ``shard`` with ``extra`` samples after its own."""
    import webdataset as wds

    samples = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
               for s in wds.WebDataset(shard, shardshuffle=False, empty_check=False)]
    with wds.TarWriter(shard) as w:
        for s in samples + extra:
            w.write(s)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny model folders, a bundle, image shards and code shards, made once for the module."""
    from pipeline.bundle import assemble_bundle
    from test_generate import make_parts

    from _vqgan_helpers import write_image_shards

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation on a shared 2-core machine
    root = tmp_path_factory.mktemp("bad_input")
    parts = make_parts(str(root / "parts"))
    bundle = assemble_bundle(parts["vqgan"], parts["prior"], parts["clip"], str(root / "bundle"))
    write_image_shards(str(root / "img" / "train"), 2, 10)
    write_image_shards(str(root / "img" / "val"), 1, 4)
    write_code_shards(str(root / "codes" / "train"), 64)
    write_code_shards(str(root / "codes" / "val"), 16, seed=1)
    images = [f"data.train={root}/img/train/*.tar", f"data.val={root}/img/val/*.tar"]
    data = {"vqgan": images, "clip": images,
            "bart_prior": [f"data.train={root}/codes/train/*.tar", f"data.val={root}/codes/val/*.tar",
                           f"tokenizer.path={root}/parts/tok"]}
    (root / "a_file").write_text("[a, list, not a mapping]\n")  # a regular file, and not a config
    yield {"root": root, "parts": parts, "bundle": bundle, "data": data}
    torch.set_num_threads(threads)


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one line, 'error: ...'."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(env(), TQDM_DISABLE="1"), capture_output=True,
                          text=True, timeout=timeout)


def train_main(argv: list[str], capsys) -> tuple[int, str]:
    import train

    capsys.readouterr()
    rc = train.main(argv)
    return rc, capsys.readouterr().err


def train_argv(world, stage: str, runs: str, *extra: str, data: bool = True) -> list[str]:
    return [stage, "--config", CONFIG[stage], f"runs_dir={runs}", "name=r", "trainer.progress_bar=false",
            *(world["data"][stage] if data else [f for f in world["data"][stage] if not f.startswith("data.")]),
            *extra]


# ---- train.py: configs refused before anything is built or written ------------------------------------------------
CONFIG_CASES = {  # name -> (overrides, expected in the message); "{root}" is the fixture's folder
    "unknown key": (["model.nope=1"], "unknown key 'model.nope'"),
    "unknown section": (["optimizer.lr=1"], "optimizer"),
    "wrong type": (["data.batch_size=eight"], "data.batch_size"),
    "wrong type trainer": (["trainer.max_steps=1.5"], "trainer.max_steps"),
    "negative image size": (["data.image_size=-32"], "data.image_size must be >= 1, got -32"),
    "zero batch size": (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    "negative batch size": (["data.batch_size=-4"], "data.batch_size must be >= 1, got -4"),
    "negative workers": (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    "negative max_steps": (["trainer.max_steps=-5"], "trainer.max_steps must be >= 1, got -5"),
    "zero max_steps": (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),
    "bad max_time": (["trainer.max_time=10 minutes"], "trainer.max_time must be DD:HH:MM:SS"),
    "pattern matching nothing": (["data.train={root}/none/*.tar"], "data.train: shard pattern"),
    "val matching nothing": (["data.val={root}/none-{{0..3}}.tar"], "data.val: shard pattern"),
    "not a config file": (["--config", "{root}/a_file"], "a_file: top level must be a mapping"),
}
MODEL_CASES = {  # stage -> [(overrides, expected)]: sizes that are negative or zero
    "vqgan": [(["model.num_codes=0"], "model.num_codes must be >= 1, got 0"),
              (["model.resolution=-32"], "model.resolution must be >= 1, got -32"),
              (["model.ch_mult=[1,0,2]"], "model.ch_mult[1] must be >= 1, got 0"),
              (["model.restart_every=0"], "model.restart_every must be >= 1")],
    "bart_prior": [(["model.codebook_size=0"], "model.codebook_size must be >= 1, got 0"),
                   (["model.d_model=-8"], "model.d_model must be >= 1, got -8"),
                   (["model.grid=[8,0]"], "model.grid[1] must be >= 1, got 0")],
    "clip": [(["model.arch.embed_dim=-1"], "model.arch.embed_dim must be >= 1, got -1"),
             (["model.arch.vision_cfg.patch_size=0"], "model.arch.vision_cfg.patch_size must be >= 1, got 0")],
}


def _config_cases():
    for stage in STAGES:
        for name, (extra, expected) in CONFIG_CASES.items():
            yield pytest.param(stage, extra, expected, id=f"{stage}-{name}")
        for extra, expected in MODEL_CASES[stage]:
            yield pytest.param(stage, extra, expected, id=f"{stage}-{extra[0]}")
        yield pytest.param(stage, ["NO_DATA"], "data.train is not set", id=f"{stage}-no data.train")


@pytest.mark.parametrize("stage, extra, expected", list(_config_cases()))
def test_train_refuses_a_bad_config_in_one_line_before_the_run_folder(world, tmp_path, capsys, stage, extra,
                                                                       expected):
    runs = str(tmp_path / "runs")
    extra = [e.format(root=world["root"]) for e in extra]
    # a second --config (the "not a config file" case) replaces the stage's: argparse keeps the last
    argv = train_argv(world, stage, runs, *[e for e in extra if e != "NO_DATA"], data="NO_DATA" not in extra)
    rc, err = train_main(argv, capsys)
    assert rc == 2 and expected in one_error_line(err), err[-2000:]
    assert not os.path.exists(runs)  # refused before the run folder (and the model) existed


def test_train_cli_process_refuses_in_one_line(world, tmp_path):
    """The same through a real process: status 2, one line, no traceback."""
    runs = str(tmp_path / "runs")
    res = run_cli(["train.py", *train_argv(world, "vqgan", runs, "model.num_codes=0")])
    assert res.returncode == 2 and "model.num_codes must be >= 1" in one_error_line(res.stderr)
    assert not os.path.exists(runs)


# ---- the hang: an epoch without a batch ----------------------------------------------------------------------------
def _prior_run(world, runs: str, train_shard: str, *extra: str) -> list[str]:
    return ["bart_prior", "--config", CONFIG["bart_prior"], f"runs_dir={runs}", "name=r", "trainer.progress_bar=false",
            f"data.train={train_shard}", f"data.val={world['root']}/codes/val/*.tar",
            f"tokenizer.path={world['root']}/parts/tok", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=4", "trainer.limit_val_batches=1", *extra]


def _prior_shard(folder, good: int, bad: list[bytes]) -> str:
    """``good`` learnable code samples, then one sample per undecodable ``.codes.npy`` payload of ``bad``."""
    write_code_shards(str(folder), good, per_shard=10 ** 6)
    shard = str(folder / "000000.tar")
    append_samples(shard, [{"__key__": f"bad{i}", "codes.npy": b, "txt": "a red circle"} for i, b in enumerate(bad)])
    return shard


def _logged(run_dir: str, key: str) -> list[float]:
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]


def test_fewer_samples_than_a_batch_stops_in_one_line_instead_of_hanging(world, tmp_path):
    """The reported hang: 32 good code samples and one float32 one, data.batch_size=40. Each epoch gave no batch
    (drop_last) and Lightning started the next one forever. The process must end, in one line, before any run folder."""
    shard = _prior_shard(tmp_path / "codes", 32, [_npy(np.zeros((8, 8), np.float32))])
    runs = str(tmp_path / "runs")
    res = run_cli(["train.py", *_prior_run(world, runs, shard, "data.batch_size=40")], timeout=150)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and "holds 33 sample(s), fewer than one batch" in line and "data.batch_size=40" in line
    assert not os.path.exists(runs)


@pytest.mark.timeout(150)
def test_an_epoch_emptied_by_skipped_samples_stops_and_counts_them(world, tmp_path, capsys):
    """40 samples of which one is not a .npy at all, batch 40: the set looks big enough, the epoch gives no batch once
    the bad sample is skipped; the run stops at the end of that epoch, naming the skip."""
    shard = _prior_shard(tmp_path / "codes", 39, [b"not an npy file"])
    rc, err = train_main(_prior_run(world, str(tmp_path / "runs"), shard, "data.batch_size=40"), capsys)
    line = one_error_line("\n".join(x for x in err.splitlines() if x.startswith("error")))
    assert rc == 2 and "gave no batch of data.batch_size=40" in line and "1 codes" in line, err[-2000:]


@pytest.mark.timeout(150)
def test_bad_code_samples_past_the_start_up_check_are_skipped_and_logged(world, tmp_path, capsys):
    """Undecodable codes, ids outside the codebook and another grid, after the 64 samples checked at start-up: the
    run proceeds (drop_last off, so the short last batch is used) and logs data/skipped_codes."""
    bad = [_npy(np.zeros((8, 8), np.float32)), _npy(np.full((8, 8), 64, np.uint16)),
           _npy(np.zeros((4, 4), np.uint16))]
    shard = _prior_shard(tmp_path / "codes", 70, bad)
    runs = tmp_path / "runs"
    rc, err = train_main(_prior_run(world, str(runs), shard, "data.batch_size=8", "data.drop_last=false",
                                    "trainer.max_steps=12", "data.shuffle_buffer=0"), capsys)
    assert rc == 0, err[-3000:]
    assert max(_logged(str(runs / "r"), "data/skipped_codes")) == 3.0


@pytest.mark.parametrize("kind, codes, expected", [
    ("wrong grid", dict(grid=(4, 4)), "code grid (4, 4) does not match model.grid [8, 8]"),
    ("ids outside the codebook", dict(codebook_size=1024), "code ids reach"),
])
def test_code_shards_that_do_not_fit_the_prior_stop_at_start_in_one_line(world, tmp_path, capsys, kind, codes,
                                                                         expected):
    pattern = write_code_shards(str(tmp_path / "codes"), 16, **codes)
    rc, err = train_main(_prior_run(world, str(tmp_path / "runs"), pattern), capsys)
    line = one_error_line(err)
    assert rc == 2 and expected in line and str(tmp_path / "codes") in line, line


def test_vqgan_encode_skips_and_counts_unusable_images(world, tmp_path, capsys):
    """vqgan.encode reads image shards as training does: the zero-byte, oversized images and the caption that is not
    UTF-8 are skipped (one warning per kind), every other image (grey, CMYK, 16-bit) is encoded with its caption."""
    from data import iter_samples
    from vqgan.encode import main

    good = _shard_with_every_kind(tmp_path / "images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["--model", f"{world['bundle']}/vqgan", "--input", str(tmp_path / "images" / "*.tar"), "--output",
                   str(tmp_path / "codes")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    kinds = sorted({str(w.message).split("(")[1].split(")")[0] for w in caught if "skipping" in str(w.message)})
    assert kinds == ["caption", "image"]
    encoded = list(iter_samples(str(tmp_path / "codes" / "*.tar"), mode="codes"))
    assert sorted(s["key"] for s in encoded) == sorted(good)
    assert {s["caption"] for s in encoded} <= set(UNICODE_CAPTIONS)


def test_a_resampled_set_where_nothing_decodes_stops_instead_of_hanging(tmp_path):
    """An endless (resampled) stream of undecodable samples never gives a batch: the loader stops with a DataError, also
    from a loader worker (where train.py shows the worker's message, not its traceback)."""
    from data import DataConfig, DataError, ShardDataModule
    from train import one_line

    with ShardWriter(str(tmp_path), shard_size=4) as w:
        for i in range(8):
            w.write({"__key__": f"k{i}", "txt": "x", "png": b"garbage"})
    for workers in (0, 1):
        cfg = DataConfig(train=str(tmp_path / "*.tar"), image_size=8, batch_size=2, resampled=True,
                         num_workers=workers, shuffle_buffer=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DataError) as err:
                next(iter(ShardDataModule(cfg).train_dataloader()))
        assert one_line(err.value).startswith("no sample of data.train decodes"), str(err.value)


# ---- model folders: truncated weights, config.json that is not JSON or contradicts the tensors ---------------------
def _truncate(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(1000)


def _not_json(path: str) -> None:
    with open(path, "w") as fh:
        fh.write("{'codebook_size': 64,")


def _set(key: str, value):
    def edit(path: str) -> None:
        with open(path) as fh:
            cfg = json.load(fh)
        node = cfg
        for k in key.split(".")[:-1]:
            node = node[k]
        node[key.split(".")[-1]] = value
        with open(path, "w") as fh:
            json.dump(cfg, fh)
    return edit


FOLDER_CASES = {  # name -> (file in the bundle, damage, expected in the message: the file, or the tensor and file)
    "vqgan truncated weights": ("vqgan/model.safetensors", _truncate, "vqgan/model.safetensors: cannot read"),
    "prior truncated weights": ("bart_prior/model.safetensors", _truncate, "bart_prior/model.safetensors: cannot"),
    "clip truncated weights": ("clip_rank/open_clip_model.safetensors", _truncate, "open_clip_model.safetensors:"),
    "vqgan config not JSON": ("vqgan/config.json", _not_json, "vqgan/config.json: not valid JSON"),
    "prior config not JSON": ("bart_prior/config.json", _not_json, "bart_prior/config.json: not valid JSON"),
    "clip config not JSON": ("clip_rank/open_clip_config.json", _not_json, "open_clip_config.json: not valid JSON"),
    "prior codebook contradicts tensors": ("bart_prior/config.json", _set("codebook_size", 32),
                                           "model.safetensors: tensor 'decoder.embed_tokens.weight' has shape (65, 32)"),
    "vqgan codebook contradicts tensors": ("vqgan/config.json", _set("num_codes", 32),
                                           "model.safetensors: tensor 'quantize.embedding.weight'"),
    "clip width contradicts tensors": ("clip_rank/open_clip_config.json", _set("model_cfg.embed_dim", 16),
                                       "open_clip_model.safetensors: tensor 'text_projection'"),
    "tokenizer config not JSON": ("bart_prior/tokenizer/tokenizer_config.json", _not_json, "tokenizer_config.json"),
    "tokenizer file missing": ("bart_prior/tokenizer/tokenizer.json", os.remove, "tokenizer.json"),
    "prior config wrong type": ("bart_prior/config.json", _set("grid", "abc"), "'grid'"),
    "vqgan config wrong type": ("vqgan/config.json", _set("num_codes", "many"), "'num_codes'"),
    "vqgan config zero codes": ("vqgan/config.json", _set("num_codes", 0), "vqgan/config.json: num_codes must be >= 1"),
}


def _damaged_bundle(world, tmp_path, rel: str, damage) -> str:
    bundle = str(tmp_path / "bundle")
    shutil.copytree(world["bundle"], bundle)
    damage(os.path.join(bundle, rel))
    return bundle


@pytest.mark.parametrize("rel, damage, expected", FOLDER_CASES.values(), ids=FOLDER_CASES.keys())
def test_generate_names_the_damaged_file_in_one_line(world, tmp_path, capsys, rel, damage, expected):
    import generate

    bundle = _damaged_bundle(world, tmp_path, rel, damage)
    capsys.readouterr()
    rc = generate.main(["--bundle", bundle, "a red circle", "--candidates", "2", "--keep", "1",
                        "--out", str(tmp_path / "out")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and expected in line and os.path.join(bundle, rel.split("/")[0]) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rel, damage, expected", FOLDER_CASES.values(), ids=FOLDER_CASES.keys())
def test_train_bundle_names_the_damaged_file_in_one_line(world, tmp_path, capsys, rel, damage, expected):
    bundle = _damaged_bundle(world, tmp_path, rel, damage)
    out = tmp_path / "assembled"
    rc, err = train_main(["bundle", "--vqgan", f"{bundle}/vqgan", "--bart-prior", f"{bundle}/bart_prior",
                          "--clip-rank", f"{bundle}/clip_rank", "--out", str(out)], capsys)
    line = one_error_line(err)
    assert rc == 2 and expected in line, line
    assert not out.exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda b: _truncate(f"{b}/vqgan/model.safetensors"), "vqgan/model.safetensors: cannot read the weights"),
    (lambda b: _not_json(f"{b}/vqgan/config.json"), "vqgan/config.json"),
], ids=["truncated weights", "config not JSON"])
def test_vqgan_encode_names_the_damaged_file_in_one_line(world, tmp_path, capsys, damage, expected):
    from vqgan.encode import main

    bundle = _damaged_bundle(world, tmp_path, "vqgan/config.json", lambda p: None)
    damage(bundle)
    capsys.readouterr()
    rc = main(["--model", f"{bundle}/vqgan", "--input", f"{world['root']}/img/val/*.tar", "--output",
               str(tmp_path / "codes")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and expected in line, line


def test_generate_process_with_a_truncated_file_is_one_line(world, tmp_path):
    bundle = _damaged_bundle(world, tmp_path, "bart_prior/model.safetensors", _truncate)
    res = run_cli(["generate.py", "--bundle", bundle, "x", "--candidates", "2", "--keep", "1", "--out",
                   str(tmp_path / "out")])
    assert res.returncode == 2 and "bart_prior/model.safetensors: cannot read" in one_error_line(res.stderr)


def test_init_from_and_pretrained_folders_name_their_file(world, tmp_path, capsys):
    """Training from a damaged folder: init_from (every stage reads its weights), CLIP's model.pretrained (reads its
    config too)."""
    bundle = _damaged_bundle(world, tmp_path, "vqgan/model.safetensors", _truncate)
    _not_json(f"{bundle}/clip_rank/open_clip_config.json")
    runs = str(tmp_path / "runs")
    for argv, expected in (
            (train_argv(world, "vqgan", runs, f"init_from={bundle}/vqgan"), "vqgan/model.safetensors: cannot read"),
            (train_argv(world, "clip", runs, f"model.pretrained={bundle}/clip_rank"),
             "open_clip_config.json: not valid JSON")):
        rc, err = train_main(argv, capsys)
        assert rc == 2 and expected in one_error_line(err), err[-2000:]


# ---- generate.py: prompts and arguments -----------------------------------------------------------------------------
# prompt -> what its one warning line says (None: no warning); the tiny prior reads 20 tokens, so a long prompt (and
# Arabic, at 2 bytes a letter for this byte-level tokenizer) is truncated, said in one line that names the prompt
PROMPTS = {"empty": ("", "an empty prompt"), "10,000 characters": ("a red circle " * 770, "'a red circle a red circle"),
           "only emoji": ("😀🎉🦄", None), "right to left": ("دائرة حمراء", "'دائرة حمراء' has 24 tokens")}


@pytest.mark.parametrize("prompt, warning", PROMPTS.values(), ids=PROMPTS.keys())
def test_generate_takes_any_prompt_with_at_most_one_warning_line_naming_it(world, tmp_path, capsys, prompt, warning):
    import generate

    capsys.readouterr()
    rc = generate.main(["--bundle", world["bundle"], prompt, "--candidates", "2", "--keep", "1", "--out",
                        str(tmp_path / "out")])
    # tqdm's progress bar shares stderr, redrawn after carriage returns: its pieces are not lines of ours
    err = [part for part in re.split(r"[\r\n]+", capsys.readouterr().err) if part.strip() and "%|" not in part]
    assert rc == 0, err
    if warning is None:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith("warning: ") and warning in err[0], err
    results = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert [r["prompt"] for r in results] == [prompt]


@pytest.mark.parametrize("args, expected", [
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--condition-scale", "nan"], "--condition-scale must be a finite number"),
    (["--out", "{root}/a_file/out"], "a_file is a file, not a folder"),
])
def test_generate_refuses_bad_arguments_before_loading_anything(world, tmp_path, capsys, args, expected):
    import generate

    args = [a.format(root=world["root"]) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert generate.main(["--bundle", str(tmp_path / "no-bundle"), "x", *args, *out]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


# ---- outputs under a regular file ----------------------------------------------------------------------------------
def test_outputs_under_a_regular_file_are_one_line(world, tmp_path, capsys):
    from data.cli import main as data_main

    under = f"{world['root']}/a_file/sub"
    rc, err = train_main(["bundle", "--vqgan", f"{world['bundle']}/vqgan", "--bart-prior", f"{world['bundle']}/bart_prior",
                          "--clip-rank", f"{world['bundle']}/clip_rank", "--out", under], capsys)
    assert rc == 2 and "a_file is a file, not a folder" in one_error_line(err)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png(Image.new("RGB", (8, 8))))
    (src / "a.txt").write_text("a caption")
    for argv in (["prepare", "folder", "--src", str(src), "--out", under],
                 ["prepare", "shapes", "--out", under, "--num-samples", "4"]):
        assert data_main(argv) == 2
        assert "a_file is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_encoder_and_tokenizer_outputs_under_a_regular_file_are_one_line(world, capsys):
    from bart_prior.tokenizer import main as tokenizer_main
    from vqgan.encode import main as encode_main

    under = f"{world['root']}/a_file/sub"
    capsys.readouterr()
    rcs = [encode_main(["--model", f"{world['bundle']}/vqgan", "--input", f"{world['root']}/img/val/*.tar",
                        "--output", under]),
           tokenizer_main(["train", "--input", f"{world['root']}/codes/val/*.tar", "--vocab-size", "300",
                           "--out", under])]
    err = capsys.readouterr().err.strip().splitlines()
    assert rcs == [2, 2] and len(err) == 2 and all("a_file" in line for line in err)


# ---- image and caption data: prepare, inspect, training and the tokenizer agree -----------------------------------
def _folder_with_every_kind(src) -> dict[str, str]:
    """One image per kind of image_members() with a caption, plus a good image whose caption is not UTF-8; returns
    stem -> caption of the usable ones."""
    src.mkdir()
    members = image_members()
    captions = {}
    for i, (name, (ext, data)) in enumerate(members.items()):
        (src / f"{name}.{ext}").write_bytes(data)
        caption = UNICODE_CAPTIONS[i % len(UNICODE_CAPTIONS)]
        (src / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        if name in GOOD_IMAGES:
            captions[name] = caption
    (src / "latin.png").write_bytes(members["rgb"][1])
    (src / "latin.txt").write_bytes(NON_UTF8)
    return captions


def _shard_with_every_kind(folder) -> list[str]:
    """The same samples as _folder_with_every_kind, as one shard; returns the usable keys."""
    members = image_members()
    with ShardWriter(str(folder), shard_size=100) as w:  # the unusable first: the first batch carries their count
        w.write({"__key__": "latin", "png": members["rgb"][1], "txt": NON_UTF8})
        for name in (*BAD_IMAGES, *GOOD_IMAGES):
            ext, data = members[name]
            w.write({"__key__": name, ext: data, "txt": UNICODE_CAPTIONS[len(name) % len(UNICODE_CAPTIONS)]})
    return list(GOOD_IMAGES)


def test_prepare_folder_skips_and_names_unusable_files(tmp_path, capsys):
    from data import iter_samples
    from data.cli import main

    src = tmp_path / "src"
    captions = _folder_with_every_kind(src)
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["unreadable_images"] == ["big.png", "bomb.png", "empty.png"]
    assert summary["unreadable_captions"] == ["latin.txt"] and summary["samples"] == len(GOOD_IMAGES)
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped "))
    assert [os.path.basename(line.split(":")[0]) for line in skipped] == ["big.png", "bomb.png", "empty.png",
                                                                          "latin.txt"]
    assert "caption is not UTF-8 (byte 0xe9 at offset 3)" in skipped[-1]
    got = {s["caption"]: s["image"] for s in iter_samples(str(tmp_path / "out" / "*.tar"), image_size=8)}
    assert sorted(got) == sorted(captions.values())  # every Unicode caption arrives as it was written
    assert all(img.shape == (3, 8, 8) for img in got.values())


def test_prepare_folder_refuses_a_captions_file_that_is_not_utf8(tmp_path, capsys):
    from data.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png(Image.new("RGB", (8, 8))))
    (tmp_path / "caps.csv").write_bytes(b"path,caption\na.png,fine\na.png," + NON_UTF8 + b"\n")
    assert main(["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--captions",
                 str(tmp_path / "caps.csv")]) == 2
    assert "caps.csv:3: not UTF-8" in one_error_line(capsys.readouterr().err)


def test_inspect_training_and_caption_reader_agree_on_what_is_corrupt(tmp_path):
    from data import DataConfig, ShardDataModule, iter_captions, iter_samples
    from data.decode import SKIP_KINDS
    from data.prepare import inspect_shards

    good = _shard_with_every_kind(tmp_path / "set")
    pattern = str(tmp_path / "set" / "*.tar")
    report = inspect_shards(pattern)
    assert report["corrupt"] == {"caption": 1, "image": len(BAD_IMAGES)}
    assert report["corrupt_samples"] == 1 + len(BAD_IMAGES) and report["samples"] == len(good) + 1 + len(BAD_IMAGES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sorted(s["key"] for s in iter_samples(pattern, image_size=8)) == sorted(good)
        captions = list(iter_captions(pattern))
    assert len(captions) == len(image_members()) and "café" not in " ".join(captions)
    assert sum("skipping corrupt samples (caption)" in str(w.message) for w in caught) == 2  # both readers warn
    # the training loader: the same samples, counted per kind in the packets its batches carry
    loader = ShardDataModule(DataConfig(train=pattern, image_size=8, batch_size=1, shuffle_buffer=0)).train_dataloader()
    keys, counts = [], dict.fromkeys(SKIP_KINDS, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            keys += batch["key"]
            for kind, n in zip(SKIP_KINDS, batch["skipped"]["counts"].tolist()):
                counts[kind] += n
    assert sorted(keys) == sorted(good)
    assert {k: n for k, n in counts.items() if n} == report["corrupt"]


def test_inspect_checks_codes_against_the_encoders_manifest(tmp_path):
    from data.prepare import inspect_shards

    write_code_shards(str(tmp_path / "codes"), 6)
    append_samples(str(tmp_path / "codes" / "000000.tar"),
                   [{"__key__": "ids", "codes.npy": _npy(np.full((8, 8), 64, np.uint16)), "txt": "x"},
                    {"__key__": "grid", "codes.npy": _npy(np.zeros((4, 4), np.uint16)), "txt": "x"},
                    {"__key__": "float", "codes.npy": _npy(np.zeros((8, 8), np.float32)), "txt": "x"}])
    pattern = str(tmp_path / "codes" / "*.tar")
    assert inspect_shards(pattern)["corrupt"] == {"codes": 1}  # without a manifest only the float array is wrong
    (tmp_path / "codes" / "manifest.json").write_text(json.dumps({"codebook_size": 64, "grid": [8, 8]}))
    report = inspect_shards(pattern)
    assert report["corrupt"] == {"codes": 3} and report["corrupt_samples"] == 3


def test_tokenizer_caption_reader_is_the_shared_one(tmp_path):
    """bart_prior.tokenizer.iter_captions must read captions as training does (data.iter_captions): a caption that
    is not UTF-8 is skipped and counted, not a UnicodeDecodeError."""
    from bart_prior.tokenizer import main

    write_code_shards(str(tmp_path / "codes"), 48)
    append_samples(str(tmp_path / "codes" / "000000.tar"),
                   [{"__key__": "latin", "codes.npy": _npy(np.zeros((8, 8), np.uint16)), "txt": NON_UTF8}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["train", "--input", str(tmp_path / "codes" / "*.tar"), "--vocab-size", "300", "--out",
                   str(tmp_path / "tok"), "--min-frequency", "1"])
    assert rc == 0 and os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    assert any("skipping corrupt samples (caption)" in str(w.message) for w in caught)


def test_data_cli_process_exit_status_and_no_traceback(tmp_path):
    src = tmp_path / "src"
    _folder_with_every_kind(src)
    res = run_cli(["-m", "data", "prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out")])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert json.loads(res.stdout)["unreadable_captions"] == ["latin.txt"]
    res = run_cli(["-m", "data", "inspect", str(tmp_path / "out" / "*.tar")])
    assert res.returncode == 0 and json.loads(res.stdout)["corrupt_samples"] == 0  # prepare kept only usable ones
    res = run_cli(["-m", "data", "prepare", "folder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "nope is not a folder" in one_error_line(res.stderr)


# ---- no pickle from a file this project did not write -------------------------------------------------------------
class _Planted:
    """Unpickling this creates a file: the proof that a load ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_code_runs_from_a_pickled_checkpoint(world, tmp_path, capsys):
    from launch.run import RunDir, find_resume_checkpoint

    marker = str(tmp_path / "code-ran")
    # a CLIP checkpoint file given as model.pretrained
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Planted(marker)}, tmp_path / "clip.pt")
    rc, err = train_main(train_argv(world, "clip", str(tmp_path / "runs"), f"model.pretrained={tmp_path}/clip.pt"),
                         capsys)
    assert rc == 2 and "clip.pt" in one_error_line(err) and not os.path.exists(marker)
    # a run folder's last.ckpt (a resume reads it): refused as unreadable, and nothing ran
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.checkpoints)
    torch.save({"global_step": 3, "payload": _Planted(marker)}, os.path.join(run.checkpoints, "last.ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_resume_checkpoint(run) is None
    assert not os.path.exists(marker)


def test_every_torch_load_in_the_project_is_weights_only():
    """torch.load without weights_only=True unpickles whatever the file holds. The one exception is the taming
    converter's explicit --trust-pickle (weights_only=not trust_pickle)."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "*", "*.py"))):
        if "/tests/" in path or "/.venv/" in path:
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") not in ("True", "not trust_pickle"):
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not found, found

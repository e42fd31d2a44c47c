"""VQGAN training end to end on tiny data: loss goes down, step semantics, accumulation, export, encoder CLI."""
from __future__ import annotations

import csv
import glob
import os

import pytest
import pytorch_lightning as pl
import torch

from tests._vqgan_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests._vqgan_helpers import TINY_YAML, blocks, tiny_run_config, write_image_shards
from vqgan import VQGAN
from vqgan.encode import main as encode_main
from vqgan.training import VQGANModule


class _Blocks(torch.utils.data.IterableDataset):
    def __init__(self, batch: int = 4):
        self.batch = batch

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        while True:
            yield {"image": blocks(self.batch, 32, seed=int(torch.randint(0, 10 ** 6, (1,), generator=g)))}


def _rec(model: VQGAN, x: torch.Tensor) -> float:
    was = model.training
    with torch.no_grad():
        rec = float((model.eval()(x)[0].clamp(-1, 1) - x).abs().mean())
    model.train(was)  # Lightning keeps module modes: a model left in eval would train in eval
    return rec


def test_training_run_lowers_reconstruction_loss_and_exports(tmp_path):
    from launch.train import run_training

    write_image_shards(str(tmp_path / "shards" / "train"), n_shards=2, per_shard=8)
    write_image_shards(str(tmp_path / "shards" / "val"), n_shards=1, per_shard=8)
    overrides = [f"runs_dir={tmp_path}/runs", f"data.train={tmp_path}/shards/train/*.tar",
                 f"data.val={tmp_path}/shards/val/*.tar", "trainer.max_steps=100", "trainer.val_check_interval=50",
                 "trainer.checkpoint_every_n_steps=50", "loss.disc_start=80", "data.num_workers=0"]
    torch.manual_seed(0)
    initial = VQGANModule(tiny_run_config(tmp_path, *overrides)).vqgan
    result = run_training("vqgan", TINY_YAML, overrides)
    assert result.trainer.global_step == 100  # generator steps, though the discriminator stepped too
    trained = VQGAN.from_pretrained(result.export_dir)
    from data import iter_samples

    x = torch.stack([s["image"] for s in iter_samples(f"{tmp_path}/shards/train/*.tar", image_size=32)])
    assert _rec(trained, x) < 0.75 * _rec(initial, x)
    rows = list(csv.DictReader(open(os.path.join(result.run.root, "csv", "metrics.csv"))))
    keys = set().union(*(r.keys() for r in rows))
    for key in ("train/rec", "train/quant", "train/g", "train/adaptive_weight", "train/logits_real",
                "train/logits_fake", "train/lr", "train/lr_disc", "train/codebook_usage", "train/perplexity",
                "val/psnr", "val/ssim", "val/codebook_usage"):
        assert key in keys, key
    assert glob.glob(os.path.join(result.run.root, "images", "val_reconstructions_*.png"))


def test_accumulation_and_discriminator_steps_do_not_advance_global_step(tmp_path):
    cfg = tiny_run_config(tmp_path, "trainer.accumulate_grad_batches=2", "loss.disc_start=0")
    torch.manual_seed(0)
    module = VQGANModule(cfg)
    d_before = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    g_before = module.vqgan.decoder.conv_out.weight.detach().clone()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(_Blocks(), batch_size=None))
    assert trainer.global_step == 3
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6  # 2 micro-batches per step
    assert not torch.equal(g_before, module.vqgan.decoder.conv_out.weight)
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.loss.discriminator.parameters()))


def test_encoder_cli_writes_code_shards_the_data_module_reads(tmp_path, capsys):
    from data import DataConfig, ShardDataModule, iter_samples

    written = write_image_shards(str(tmp_path / "img"), n_shards=3, per_shard=3)
    torch.manual_seed(0)
    model = VQGANModule(tiny_run_config(tmp_path)).vqgan.eval()
    model.save_pretrained(str(tmp_path / "model"))
    args = ["--model", str(tmp_path / "model"), "--input", str(tmp_path / "img" / "*.tar"),
            "--output", str(tmp_path / "codes"), "--batch-size", "2"]
    assert encode_main(args) == 0
    shards = sorted(glob.glob(str(tmp_path / "codes" / "*.tar")))
    assert [os.path.basename(s) for s in shards] == [f"rank00-{i:06d}.tar" for i in range(3)]
    back = list(iter_samples(str(tmp_path / "codes" / "*.tar"), mode="codes"))
    assert [(s["key"], s["caption"]) for s in back] == written
    images = torch.stack([s["image"] for s in iter_samples(str(tmp_path / "img" / "*.tar"), image_size=32)])
    expected = model.encode(images)
    assert torch.equal(torch.stack([s["codes"] for s in back]), expected)
    assert model.decode(expected).shape == (9, 3, 32, 32)
    dm = ShardDataModule(DataConfig(train=str(tmp_path / "codes" / "*.tar"), val=str(tmp_path / "codes" / "*.tar"),
                                    mode="codes", batch_size=3, num_workers=0))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["codes"].shape == (3, 8, 8) and batch["key"] == [k for k, _ in written[:3]]
    # resumable: finished shards are skipped; a missing one is redone
    mtimes = [os.path.getmtime(s) for s in shards]
    os.remove(shards[1])
    assert encode_main(args) == 0
    assert [os.path.getmtime(s) for s in (shards[0], shards[2])] == [mtimes[0], mtimes[2]]
    assert os.path.exists(shards[1])
    assert encode_main(["--model", str(tmp_path / "nope")] + args[2:]) == 2
    assert "save_pretrained" in capsys.readouterr().err


def test_encoder_writes_a_manifest_and_refuses_to_mix_two_codebooks(tmp_path, capsys):
    """The manifest makes the prior's start-up check exact: codes of a 64-code VQGAN never exceed 63, so without it
    a 128-code prior would train on them silently."""
    import json

    from bart_prior.shards import CodeShardMismatch, check_code_shards

    write_image_shards(str(tmp_path / "img"), n_shards=2, per_shard=2)
    for name, codes in (("a", 64), ("b", 32)):
        torch.manual_seed(0)
        VQGANModule(tiny_run_config(tmp_path, f"model.num_codes={codes}")).vqgan.eval().save_pretrained(
            str(tmp_path / name))
    args = ["--input", str(tmp_path / "img" / "*.tar"), "--output", str(tmp_path / "codes")]
    assert encode_main(["--model", str(tmp_path / "a"), *args]) == 0
    with open(tmp_path / "codes" / "manifest.json") as fh:
        assert json.load(fh) == {"codebook_size": 64, "grid": [8, 8], "vqgan": str(tmp_path / "a")}
    pattern = str(tmp_path / "codes" / "*.tar")
    check_code_shards(pattern, 64, (8, 8))
    with pytest.raises(CodeShardMismatch, match="64-entry codebook but model.codebook_size is 128"):
        check_code_shards(pattern, 128, (8, 8))
    capsys.readouterr()
    assert encode_main(["--model", str(tmp_path / "b"), *args]) == 2  # same folder, another codebook
    assert "another VQGAN (64 codes" in capsys.readouterr().err
    assert encode_main(["--model", str(tmp_path / "a"), *args]) == 0  # the same VQGAN again: a no-op resume
    os.remove(tmp_path / "codes" / "manifest.json")
    assert encode_main(["--model", str(tmp_path / "a"), *args]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_encoder_with_two_processes_deals_shards_round_robin(tmp_path):
    """--devices 2 (local processes, CPU here): each rank writes its own shards; together they hold exactly the
    codes of the single-process run, same keys."""
    from data import iter_samples
    from vqgan.encode import encode

    write_image_shards(str(tmp_path / "img"), n_shards=3, per_shard=2)
    torch.manual_seed(0)
    VQGANModule(tiny_run_config(tmp_path)).vqgan.eval().save_pretrained(str(tmp_path / "model"))
    one = encode(str(tmp_path / "model"), str(tmp_path / "img" / "*.tar"), str(tmp_path / "one"), batch_size=2)
    two = encode(str(tmp_path / "model"), str(tmp_path / "img" / "*.tar"), str(tmp_path / "two"), devices=2,
                 batch_size=2)
    assert [os.path.basename(s) for s in two] == ["rank00-000000.tar", "rank00-000002.tar", "rank01-000001.tar"]

    def by_key(paths: list) -> dict:
        return {s["key"]: s["codes"] for p in paths for s in iter_samples(p, mode="codes")}

    a, b = by_key(one), by_key(two)
    assert sorted(a) == sorted(b) and len(a) == 6
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_loads_weights_and_refuses_missing_or_misfit_folders(tmp_path):
    from core.errors import ModelFolderError

    torch.manual_seed(0)
    src = VQGANModule(tiny_run_config(tmp_path)).vqgan
    src.save_pretrained(str(tmp_path / "start"))
    torch.manual_seed(1)
    module = VQGANModule(tiny_run_config(tmp_path, f"init_from={tmp_path}/start"))
    assert torch.equal(module.vqgan.decoder.conv_out.weight.contiguous(), src.decoder.conv_out.weight.contiguous())
    with pytest.raises(ModelFolderError, match="absent: no such folder; init_from takes a VQGAN"):
        VQGANModule(tiny_run_config(tmp_path, f"init_from={tmp_path}/absent"))
    with pytest.raises(ModelFolderError, match="init_from .*model.safetensors: tensor 'quantize.embedding.weight'"):
        VQGANModule(tiny_run_config(tmp_path, f"init_from={tmp_path}/start", "model.num_codes=32"))

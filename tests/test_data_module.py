"""ShardDataModule: batch format, rank x worker splitting, resampled epochs, errors, skip counts reaching the logs."""
from __future__ import annotations

import csv
import os

import pytest
import pytorch_lightning as pl
import torch

from data import DataConfig, DataError, ShardDataModule, ShardWriter
from _data_helpers import pattern, png, write_set


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batches_match_the_contract(tmp_path):
    write_set(str(tmp_path / "img"), 2, 5)
    write_set(str(tmp_path / "codes"), 2, 5, codes=True)
    cfg = DataConfig(train=pattern(str(tmp_path / "img"), 2), image_size=8, batch_size=4, shuffle_buffer=4)
    batch = next(iter(ShardDataModule(cfg).train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == len(batch["key"]) == 4 and batch["caption"][0].startswith("caption ")
    cfg = DataConfig(train=str(tmp_path / "codes/*.tar"), mode="codes", batch_size=3, shuffle_buffer=0)
    batch = next(iter(ShardDataModule(cfg).train_dataloader()))
    assert batch["codes"].shape == (3, 2, 3) and batch["codes"].dtype == torch.long


def test_two_ranks_two_workers_cover_every_sample_once(tmp_path):
    keys = write_set(str(tmp_path), 8, 5)
    cfg = DataConfig(train=pattern(str(tmp_path), 8), val=str(tmp_path / "000000.tar"), image_size=8,
                     batch_size=3, num_workers=2, shuffle_buffer=10, drop_last=False)
    train, val = [], []
    for rank in range(2):
        dm = ShardDataModule(cfg, rank=rank, world_size=2)
        train.append(_keys(dm.train_dataloader()))
        val.append(_keys(dm.val_dataloader()))  # one val shard < 4 readers: split by sample
    assert not set(train[0]) & set(train[1]) and sorted(train[0] + train[1]) == keys
    assert not set(val[0]) & set(val[1]) and sorted(val[0] + val[1]) == keys[:5]
    dm = ShardDataModule(cfg, rank=0, world_size=2)
    loader = dm.train_dataloader()  # a new shard order and sample order every epoch, same coverage
    first, second = _keys(loader), _keys(loader)
    assert first != second and sorted(first) != sorted(train[1])


def test_resampled_mode_gives_equal_batch_counts(tmp_path):
    write_set(str(tmp_path), 3, 4)
    cfg = DataConfig(train=str(tmp_path / "*.tar"), image_size=8, batch_size=2, num_workers=2,
                     resampled=True, epoch_samples=20, shuffle_buffer=4)
    counts = []
    for rank in range(2):
        loader = ShardDataModule(cfg, rank=rank, world_size=2).train_dataloader()
        counts.append((len(loader), sum(1 for _ in loader)))
    assert counts[0] == counts[1] == (6, 6)  # 20 samples / (2 ranks x 2) = 5 -> rounded up to a worker multiple


def test_clear_errors(tmp_path):
    write_set(str(tmp_path), 2, 2)
    with pytest.raises(DataError, match="matches no file"):
        ShardDataModule(DataConfig(train=str(tmp_path / "missing/*.tar"))).train_dataloader()
    cfg = DataConfig(train=str(tmp_path / "*.tar"), num_workers=2)
    with pytest.raises(DataError, match=r"2 shard\(s\) but 2 rank\(s\) x 2 worker"):
        ShardDataModule(cfg, rank=0, world_size=2).train_dataloader()
    with pytest.raises(DataError, match="data.mode"):
        ShardDataModule(DataConfig(train=str(tmp_path / "*.tar"), mode="video"))


class _Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.seen_keys: set[str] = set()

    def training_step(self, batch, batch_idx):
        assert "skipped" not in batch  # the data module takes the counts out before the model sees the batch
        return ((batch["image"].mean(dim=(0, 2, 3)) - self.w) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_counts_are_logged(tmp_path):
    with ShardWriter(str(tmp_path / "shards"), shard_size=6) as w:
        for i in range(12):
            sample = {"__key__": f"k{i}", "txt": f"c{i}", "png": png((i, i, i))}
            if i == 3:
                sample["png"] = b"garbage"
            if i == 7:
                del sample["txt"]
            w.write(sample)
    cfg = DataConfig(train=str(tmp_path / "shards/*.tar"), image_size=8, batch_size=2, shuffle_buffer=0)
    dm = ShardDataModule(cfg)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=1, logger=pl.loggers.CSVLogger(
        str(tmp_path), name="csv", version=""), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="skipping corrupt samples"):
        trainer.fit(_Probe(), datamodule=dm)
    assert dm.tally.totals["image"] == 1 and dm.tally.totals["caption"] == 1
    with open(os.path.join(tmp_path, "csv", "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["data/skipped_image"]) for r in rows if r.get("data/skipped_image")]
    assert logged and logged[-1] == 1.0

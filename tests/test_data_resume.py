"""A resumed run continues the data stream where its checkpoint was taken (epoch and position in the epoch)."""
from __future__ import annotations

import pytest

from _data_helpers import write_set
from data import DataConfig, ShardDataModule


def keys_of(loader, epochs):
    """Batches' keys over ``epochs`` passes of one loader (its streams advance one epoch per pass)."""
    return [[list(b["key"]) for b in loader] for _ in range(epochs)]


@pytest.mark.parametrize("resampled,workers", [(True, 0), (True, 2), (False, 0)])
def test_resume_mid_epoch_continues_the_stream(tmp_path, resampled, workers):
    write_set(str(tmp_path), n_shards=4, per_shard=12, size=8, codes=True)
    cfg = DataConfig(train=str(tmp_path / "*.tar"), mode="codes", batch_size=4, shuffle_buffer=8,
                     resampled=resampled, num_workers=workers, seed=5)
    full = keys_of(ShardDataModule(cfg).train_dataloader(), epochs=2)
    assert full[0] != full[1]  # each epoch draws a new stream
    for epoch, consumed in ((0, 5), (1, 2)):
        resumed = ShardDataModule(cfg)
        resumed.load_state_dict({"position": {"epoch": epoch, "batches": consumed}})
        rest = [list(b["key"]) for b in resumed.train_dataloader()]
        if workers <= 1:
            assert rest == full[epoch][consumed:]
        else:  # the same batches; the loader restarts its round-robin over workers at worker 0
            assert sorted(rest) == sorted(full[epoch][consumed:])


def test_state_dict_round_trip():
    dm = ShardDataModule(DataConfig(train="unused", mode="codes"))
    dm.position = {"epoch": 3, "batches": 7}
    other = ShardDataModule(DataConfig(train="unused", mode="codes"))
    other.load_state_dict(dm.state_dict())
    assert other.position == {"epoch": 3, "batches": 7}

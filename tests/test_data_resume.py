"""A resumed run reads exactly the batches an uninterrupted run reads: the same samples, in the same order, with the
same crops and flips, with 0 to 3 loader workers, resampled or not, with corrupt samples in the set, from any point of
an epoch (including its last batch), and on every rank of a 2-rank job."""
from __future__ import annotations

import dataclasses
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, ShardDataModule, ShardWriter


def write_noise_set(out_dir: str, sizes: list[int], corrupt_every: int = 7) -> None:
    """Shards of ``sizes[i]`` samples: 12x10 noise images (a crop or flip changes the pixels), every
    ``corrupt_every``-th sample's image undecodable."""
    i = 0
    for s, n in enumerate(sizes):
        with ShardWriter(out_dir, shard_size=n, start_index=s) as writer:
            for _ in range(n):
                pixels = np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                data = buf.getvalue() if i % corrupt_every else b"not a png"
                writer.write({"__key__": f"s{i:05d}", "txt": f"caption {i}", "png": data})
                i += 1


class Run:
    """A data module driven as Lightning drives it: one train loader, iterated once per epoch, one batch fetched
    ahead (so the last batch of an epoch is known as such), every batch passed through ``on_before_batch_transfer``
    (which records the position checkpoints save)."""

    def __init__(self, cfg: DataConfig, state: dict | None = None, rank=None, world=None):
        self.dm = ShardDataModule(cfg, rank=rank, world_size=world)
        self.progress = SimpleNamespace(is_last_batch=False)
        self.dm.trainer = SimpleNamespace(training=True, current_epoch=0, fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=self.progress)))
        if state is not None:
            self.dm.load_state_dict(state)
        self.loader = self.dm.train_dataloader()

    def epoch(self, epoch: int, stop: int | None = None) -> list[dict]:
        self.dm.trainer.current_epoch = epoch
        out = []
        it = iter(self.loader)
        ahead = next(it, None)
        while ahead is not None:
            batch, ahead = ahead, next(it, None)
            self.progress.is_last_batch = ahead is None
            out.append(self.dm.on_before_batch_transfer(batch, 0))
            if stop is not None and len(out) == stop:
                break
        return out


def same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])


CASES = [(True, 0), (True, 2), (True, 3), (False, 0), (False, 3)]


@pytest.mark.parametrize("resampled,workers", CASES)
def test_resume_reads_exactly_the_uninterrupted_batches(tmp_path, resampled, workers):
    # shards of unequal sizes: without resampling the 3 workers read 3, 2 and 2 shards and run out at different
    # batches, so the loader's round robin skips the finished ones
    write_noise_set(str(tmp_path), [9, 5, 11, 6, 8, 7, 10])
    cfg = DataConfig(train=str(tmp_path / "*.tar"), image_size=8, batch_size=3, shuffle_buffer=6, random_crop=True,
                     random_flip=True, resampled=resampled, num_workers=workers, seed=5)
    straight = Run(cfg)
    epochs = [straight.epoch(0), straight.epoch(1)]
    assert [b["key"] for b in epochs[0]] != [b["key"] for b in epochs[1]]  # each epoch draws a new stream
    total = straight.dm.tally.totals["image"]
    assert total > 0
    n0 = len(epochs[0])
    for epoch, consumed in ((0, 1), (0, 5), (0, n0 - 1), (0, n0), (1, 4)):
        first = Run(cfg)
        for e in range(epoch):
            first.epoch(e)
        first.epoch(epoch, stop=consumed)
        state = first.dm.state_dict()  # what a checkpoint after `consumed` batches of `epoch` holds
        resumed = Run(cfg, state)
        if consumed < len(epochs[epoch]):
            same(resumed.epoch(epoch), epochs[epoch][consumed:])
        else:  # resumed after the last batch of an epoch: Lightning starts the next one, and so does the loader
            assert state["epoch_done"]
        if epoch == 0:
            same(resumed.epoch(1), epochs[1])  # and the next epoch is the uninterrupted run's too
            assert resumed.dm.tally.totals == straight.dm.tally.totals  # skip counts: not lost, not counted twice


def test_every_rank_of_a_two_rank_job_resumes_exactly(tmp_path):
    write_noise_set(str(tmp_path), [9, 5, 11, 6, 8, 7, 10, 4])
    cfg = DataConfig(train=str(tmp_path / "*.tar"), image_size=8, batch_size=2, shuffle_buffer=4, random_crop=True,
                     resampled=True, epoch_samples=48, num_workers=2, seed=1)
    straight = [Run(cfg, rank=r, world=2).epoch(0) for r in range(2)]
    stopped = [Run(cfg, rank=r, world=2) for r in range(2)]
    for run in stopped:
        run.epoch(0, stop=5)
    # what the checkpoint holds: every rank's readers (Lightning gathers them when it saves on all ranks)
    state = stopped[0].dm.state_dict()
    state["ranks"] = [run.dm.state_dict()["ranks"][0] for run in stopped]
    for r in range(2):
        same(Run(cfg, state, rank=r, world=2).epoch(0), straight[r][5:])


def test_another_worker_count_resumes_approximately_and_says_so(tmp_path):
    write_noise_set(str(tmp_path), [6, 6, 6, 6], corrupt_every=10 ** 6)
    cfg = DataConfig(train=str(tmp_path / "*.tar"), image_size=8, batch_size=2, shuffle_buffer=4, resampled=True,
                     num_workers=0, seed=2)
    run = Run(cfg)
    run.epoch(0, stop=3)
    state = run.dm.state_dict()
    wider = dataclasses.replace(cfg, num_workers=2)
    with pytest.warns(UserWarning, match="approximate"):
        rest = Run(wider, state).epoch(0)
    assert len(rest) == ShardDataModule(wider).steps_per_epoch() - 3  # the epoch still ends at its length


def test_state_dict_round_trip():
    dm = ShardDataModule(DataConfig(train="unused", mode="codes", num_workers=2))
    dm.position = {"epoch": 3, "batches": 7}
    dm._done, dm._next = [[4, 13], [3, 9]], 0
    other = ShardDataModule(DataConfig(train="unused", mode="codes", num_workers=2))
    other.load_state_dict(dm.state_dict())
    assert other.position == {"epoch": 3, "batches": 7}
    assert other._resume == {"epoch": 3, "next": 0, "done": [[4, 13], [3, 9]]}

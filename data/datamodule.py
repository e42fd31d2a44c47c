"""The LightningDataModule shared by the three components: WebDataset shards -> batches, distributed-correct.

Splitting: in the default mode the shard list is shuffled with the same seed on every rank (a new order each
epoch), then split by rank, then by DataLoader worker, so every (rank, worker) reads a disjoint set of whole shards
and together they cover the set once per epoch; there must be at least ranks x workers shards. In ``resampled``
mode every (rank, worker) draws shards with replacement from its own seeded stream and stops after a fixed number
of batches, so every rank runs exactly the same number of steps per epoch (the mode to use for multi-GPU runs).
Samples are mixed across shards in a shuffle buffer. Validation is never shuffled or resampled: shards are split
by rank and worker when there are enough of them, otherwise every reader scans all shards and keeps one sample in
ranks x workers; either way every sample is seen exactly once per validation (per-rank batch counts may differ).

Skipped samples: each batch carries ``batch["skipped"]`` (counts since the previous batch of that worker). The
module's ``on_before_batch_transfer`` hook removes it before the LightningModule sees the batch and adds it to
``self.tally``; :class:`SkippedSamplesLogger` (attached automatically in ``setup``) logs the totals summed over
ranks as ``data/skipped_<kind>`` every ``log_every_n_steps``.
"""
from __future__ import annotations

import math
import random
import warnings
from itertools import islice
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from data.config import DataConfig, check_values
from data.decode import SKIP_KINDS, SampleDecoder, SkipCounter, SkipTally, collate
from data.errors import DataError
from data.shards import _is_url, count_samples, expand_pattern, read_stages


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _RankSplit:
    """nodesplitter: every ``world``-th shard, starting at ``rank`` (picklable, so spawned workers work too)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        yield from islice(src, self.rank, None, self.world)


class _SampleSplit:
    """Every reader scans all shards and keeps the samples of its slot among ranks x workers (small val sets)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        for i, sample in enumerate(src):
            if i % slots == slot:
                yield sample


class _WorkerSeed:
    """Seed of a resampled shard stream: distinct for every (rank, worker)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker()[0]


class _SampleShuffle(wds.detshuffle):
    """Shuffle buffer seeded by (seed, rank, worker, epoch): reproducible, and different in every reader."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        super().__init__(bufsize, min(bufsize, 256), seed=seed)
        self.rank = rank

    def run(self, src):
        self.epoch += 1
        rng = random.Random(f"{self.seed}/{self.rank}/{_worker()[0]}/{self.epoch}")
        return wds.filters._shuffle(src, self.bufsize, self.initial, rng)


class _SkipOnce:
    """Drop the first samples of the first pass, so a resumed run continues its epoch where the checkpoint was taken.

    ``batches`` train batches had been consumed over all readers; batches come from the readers in turn, so this
    reader skips its share (counted in samples, before decoding, which keeps a large skip cheap).
    """

    def __init__(self, batches: int, batch_size: int):
        self.batches, self.batch_size = batches, batch_size
        self.done = False

    def reader_share(self) -> int:
        worker, workers = _worker()
        return len(range(worker, self.batches, workers))

    def __call__(self, src):
        skip = 0 if self.done else self.reader_share() * self.batch_size
        self.done = True
        yield from islice(src, skip, None)


class _EpochLimit:
    """Ends each pass of an endless (resampled) stream after ``batches`` batches of this reader; the first pass of
    a resumed run is shorter by the batches its :class:`_SkipOnce` skipped."""

    def __init__(self, batches: int, skip: Optional[_SkipOnce]):
        self.batches, self.skip = batches, skip
        self.first = True

    def __call__(self, src):
        n = self.batches - (self.skip.reader_share() if self.skip is not None and self.first else 0)
        self.first = False
        yield from islice(src, max(0, n))


class _Decode:
    """The decoding stage: raw samples -> decoded ones, corrupt ones skipped (and counted by the decoder).

    An endless (resampled) stream in which nothing decodes would never yield a batch, and the run would wait forever.
    Shards are drawn with replacement, so a set with g good samples out of n shows a run of more than ``20 n``
    skipped samples in a row with probability about exp(-20 g): after that many, this stage stops the run with a
    DataError instead (``samples``: the set's size, None when unknown, e.g. remote shards: no check)."""

    RUN_FACTOR = 20

    def __init__(self, decoder: SampleDecoder, samples: Optional[int], endless: bool):
        self.decoder = decoder
        self.limit = self.RUN_FACTOR * samples if endless and samples else None

    def __call__(self, src):
        failed = 0
        for sample in src:
            out = self.decoder(sample)
            if out is not None:
                failed = 0
                yield out
                continue
            failed += 1
            if self.limit is not None and failed > self.limit:
                totals = ", ".join(f"{n} {k}" for k, n in self.decoder.counter.totals.items() if n)
                raise DataError(f"no sample of data.train decodes: {failed} skipped in a row in a set of "
                                f"{self.limit // self.RUN_FACTOR} ({totals}); check it with `python -m data inspect`")


class _Collate:
    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.counter)


class ShardDataModule(pl.LightningDataModule):
    """Batches ``{"image"|"codes", "caption", "key"}`` from the shards named by ``cfg`` (a :class:`DataConfig`).

    ``rank``/``world_size`` default to torch.distributed's (set by Lightning before dataloaders are built), else
    0/1; pass them explicitly to build the loader of one rank of a simulated job.
    """

    def __init__(self, cfg: DataConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                 codebook_size: Optional[int] = None, grid: Optional[tuple[int, int]] = None):
        """``codebook_size``, ``grid`` (codes mode): code samples with ids outside the codebook or another grid
        are skipped and counted (``data/skipped_codes``) instead of reaching the model."""
        super().__init__()
        self.cfg = cfg
        self._rank, self._world = rank, world_size
        self._codes_spec = (codebook_size, tuple(grid) if grid is not None else None)
        self.tally = SkipTally()
        # the train position (epoch, batches consumed in it): saved in checkpoints, restored before the loaders
        self.position = {"epoch": 0, "batches": 0}
        self._resume_from: Optional[dict[str, int]] = None
        # the train pipeline's skip counter when it runs in this process (num_workers 0), for the empty-epoch check
        self._train_counter: Optional[SkipCounter] = None
        check_values(cfg)

    # ---- distribution -------------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @property
    def _readers(self) -> int:
        return max(1, self.cfg.num_workers)

    def _decoder(self, train: bool, counter: SkipCounter) -> SampleDecoder:
        c = self.cfg
        return SampleDecoder(c.mode, c.image_size, caption_key=c.caption_key, train=train,
                             random_crop=c.random_crop, random_flip=c.random_flip, counter=counter,
                             codebook_size=self._codes_spec[0], grid=self._codes_spec[1])

    def steps_per_epoch(self) -> Optional[int]:
        """Batches per rank per epoch in resampled mode (None otherwise: it depends on the shard split)."""
        if not self.cfg.resampled:
            return None
        rank, world = self.rank_world()
        samples = self.cfg.epoch_samples or count_samples(expand_pattern(self.cfg.train))
        per_rank = max(1, samples // (world * self.cfg.batch_size))
        return math.ceil(per_rank / self._readers) * self._readers

    def _set_size(self, urls: list[str]) -> Optional[int]:
        """Resampled mode: the train set's size (tar headers; data.epoch_samples for remote shards), else None."""
        if not self.cfg.resampled:
            return None
        return self.cfg.epoch_samples if any(_is_url(u) for u in urls) else count_samples(urls)

    # ---- datasets -----------------------------------------------------------------------------------------
    def train_dataset(self) -> wds.DataPipeline:
        c = self.cfg
        urls = expand_pattern(c.train)
        rank, world = self.rank_world()
        seed = int(c.seed)
        counter = SkipCounter()
        self._train_counter = counter
        if c.resampled:
            stages: list = [wds.ResampledShards(urls, seed=seed, worker_seed=_WorkerSeed(rank), deterministic=True)]
        else:
            if len(urls) < world * self._readers:
                raise DataError(f"data.train has {len(urls)} shard(s) but {world} rank(s) x {self._readers} "
                                "worker(s) need at least one each: write more/smaller shards, lower "
                                "data.num_workers, or set data.resampled=true")
            if world > 1:
                warnings.warn("data.resampled is false on several ranks: ranks may get unequal batch counts per "
                              "epoch (shards differ in size); set data.resampled=true for multi-rank training")
            # same seed on every rank -> same permutation, so the rank split stays disjoint
            stages = [wds.SimpleShardList(urls), wds.detshuffle(len(urls), len(urls), seed=seed),
                      _RankSplit(rank, world), wds.split_by_worker]
        stages += read_stages(counter)
        if c.shuffle_buffer > 1:
            stages.append(_SampleShuffle(c.shuffle_buffer, seed, rank))
        skip = None
        if self._resume_from:
            # every seeded stage draws its epoch-th stream: start them at the resumed epoch, then skip what was used
            for stage in stages:
                if hasattr(stage, "epoch"):
                    stage.epoch = self._resume_from["epoch"] - 1
            skip = _SkipOnce(self._resume_from["batches"], c.batch_size)
            stages.append(skip)
        stages += [_Decode(self._decoder(True, counter), self._set_size(urls), endless=c.resampled),
                   wds.batched(c.batch_size, collation_fn=_Collate(counter), partial=not c.drop_last)]
        if c.resampled:
            steps = self.steps_per_epoch()
            stages.append(_EpochLimit(steps // self._readers, skip))
            return wds.DataPipeline(*stages).with_length(steps, silent=True)
        return wds.DataPipeline(*stages)

    def val_dataset(self) -> Optional[wds.DataPipeline]:
        c = self.cfg
        if not c.val:
            return None
        urls = expand_pattern(c.val)
        rank, world = self.rank_world()
        counter = SkipCounter()
        if len(urls) >= world * self._readers:
            stages: list = [wds.SimpleShardList(urls), _RankSplit(rank, world), wds.split_by_worker,
                            *read_stages(counter)]
        else:
            stages = [wds.SimpleShardList(urls), *read_stages(counter), _SampleSplit(rank, world)]
        stages += [wds.map(self._decoder(False, counter)),
                   wds.batched(c.val_batch_size or c.batch_size, collation_fn=_Collate(counter), partial=True)]
        return wds.DataPipeline(*stages)

    def _loader(self, dataset: wds.DataPipeline) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> Any:
        dataset = self.val_dataset()
        return self._loader(dataset) if dataset is not None else []

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not any(isinstance(cb, SkippedSamplesLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(SkippedSamplesLogger())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "skipped" in batch:
            self.tally.add(batch.pop("skipped"))
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self.position["epoch"]:
                self.position = {"epoch": trainer.current_epoch, "batches": 0}
            self.position["batches"] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": dict(self.position), "skipped": dict(self.tally.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next train loader continues the saved epoch after its consumed batches. Exact with 0 or 1
        loader workers; with more, the same batches come in another interleaving (the loader restarts its
        round-robin at worker 0); corrupt samples skipped before the checkpoint shift the position by that many."""
        self.position = dict(state.get("position", self.position))
        self._resume_from = dict(self.position)
        for kind, n in state.get("skipped", {}).items():
            if kind in self.tally.totals:
                self.tally.totals[kind] = n

    def check_epoch_end(self, epoch: int) -> None:
        """DataError when training epoch ``epoch`` gave no batch at all: Lightning would start the next (as empty)
        epoch forever. Happens when fewer samples than one batch decode, e.g. after corrupt ones are skipped, with
        data.drop_last, or when each loader worker's shards hold fewer than a batch."""
        if self.position["epoch"] == epoch and self.position["batches"] > 0:
            return
        if self._train_counter is not None and self.cfg.num_workers == 0:
            self.tally.add(self._train_counter.take())  # what this process skipped, counted though no batch came
        skipped = ", ".join(f"{n} {kind}" for kind, n in self.tally.totals.items() if n)
        c = self.cfg
        why = " with data.drop_last=true" if c.drop_last else ""
        if c.drop_last and c.num_workers > 1:
            why += f" ({c.num_workers} loader workers, each batching the whole shards it reads)"
        raise DataError(f"an epoch of data.train ({c.train}) gave no batch of data.batch_size={c.batch_size}{why}"
                        + (f"; samples skipped as corrupt: {skipped}" if skipped else "")
                        + ": lower data.batch_size, set data.drop_last=false or data.resampled=true, or check the "
                        "set with `python -m data inspect`")


class SkippedSamplesLogger(pl.Callback):
    """Logs ``data/skipped_<kind>`` (cumulative, summed over ranks) every ``log_every_n_steps`` training steps, and
    stops a run whose training epoch gave no batch (:meth:`ShardDataModule.check_epoch_end`)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, ShardDataModule):
            datamodule.check_epoch_end(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tally = getattr(trainer.datamodule, "tally", None)
        if tally is None or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        for kind in SKIP_KINDS:  # every rank logs every kind, so the summing all-reduce lines up
            pl_module.log(f"data/skipped_{kind}", float(tally.totals[kind]), on_step=True, on_epoch=False,
                          reduce_fx="sum", sync_dist=True)

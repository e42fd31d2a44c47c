"""The LightningDataModule shared by the three components: WebDataset shards -> batches, distributed-correct.

Splitting: in the default mode the shard list is shuffled with the same seed on every rank (a new order each
epoch), then split by rank, then by DataLoader worker, so every (rank, worker) reads a disjoint set of whole shards
and together they cover the set once per epoch; there must be at least ranks x workers shards. In ``resampled``
mode every (rank, worker) draws shards with replacement from its own seeded stream and stops after a fixed number
of batches, so every rank runs exactly the same number of steps per epoch (the mode to use for multi-GPU runs).
Samples are mixed across shards in a shuffle buffer. Validation is never shuffled or resampled: shards are split
by rank and worker when there are enough of them, otherwise every reader scans all shards and keeps one sample in
ranks x workers; either way every sample is seen exactly once per validation (per-rank batch counts may differ).

Resume: every random stream of the train pipeline (shard order or draw, shuffle buffer, crop and flip) is a function
of (data.seed, rank, reader, epoch), and each batch carries its reader's position; checkpoints save the positions
(:meth:`ShardDataModule.state_dict`) and a resumed run continues every reader where it stopped, in the same order
across loader workers, so it reads exactly the batches an uninterrupted run reads (data.stages.Reader).

Skipped samples: each batch carries ``batch["skipped"]`` (counts since the previous batch of that worker). The
module's ``on_before_batch_transfer`` hook removes it before the LightningModule sees the batch and adds it to
``self.tally``; :class:`SkippedSamplesLogger` (attached automatically in ``setup``) logs the totals summed over
ranks as ``data/skipped_<kind>`` every ``log_every_n_steps``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data.config import DataConfig, check_values
from data.decode import SKIP_KINDS, SampleDecoder, SkipCounter, SkipTally
from data.errors import DataError
from data.shards import _is_url, count_samples, expand_pattern, read_stages
from data.stages import (Batch, Collate, Decode, EpochLimit, RankSplit, Reader, SampleShuffle, SampleSplit, Skip,
                         TrainShards)


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
        # the train position (epoch, batches consumed in it) and each reader's (batches, raw samples) in that epoch,
        # plus the reader due next: saved in checkpoints, restored before the loaders are built
        self.position = {"epoch": 0, "batches": 0}
        self._done: list[list[int]] = [[0, 0] for _ in range(self._readers)]
        self._next = 0
        self._resume: Optional[dict[str, Any]] = None  # {"epoch", "next", "done"} for the next train loader
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
        if not c.resampled:
            if len(urls) < world * self._readers:
                raise DataError(f"data.train has {len(urls)} shard(s) but {world} rank(s) x {self._readers} "
                                "worker(s) need at least one each: write more/smaller shards, lower "
                                "data.num_workers, or set data.resampled=true")
            if world > 1:
                warnings.warn("data.resampled is false on several ranks: ranks may get unequal batch counts per "
                              "epoch (shards differ in size); set data.resampled=true for multi-rank training")
        resume, self._resume = self._resume, None  # the first loader after load_state_dict continues the epoch
        reader = Reader(rank, world, int(c.seed), start_epoch=resume["epoch"] if resume else 0,
                         resume={"next": resume["next"], "done": resume["done"]} if resume else None)
        counter = SkipCounter()
        self._train_counter = reader.counter = counter
        stages: list = [TrainShards(urls, reader, c.resampled), *read_stages(counter)]
        if c.shuffle_buffer > 1:
            stages.append(SampleShuffle(c.shuffle_buffer, reader))
        if resume:
            stages.append(Skip(reader, counter))
        stages += [Decode(self._decoder(True, counter), self._set_size(urls), endless=c.resampled, reader=reader),
                   Batch(c.batch_size, Collate(counter, reader), partial=not c.drop_last)]
        if c.resampled:
            steps = self.steps_per_epoch()
            stages.append(EpochLimit(steps // self._readers, reader))
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
            stages: list = [wds.SimpleShardList(urls), RankSplit(rank, world), wds.split_by_worker,
                            *read_stages(counter)]
        else:
            stages = [wds.SimpleShardList(urls), *read_stages(counter), SampleSplit(rank, world)]
        stages += [wds.map(self._decoder(False, counter)),
                   wds.batched(c.val_batch_size or c.batch_size, collation_fn=Collate(counter), partial=True)]
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
        stamp = batch.pop("reader", None) if isinstance(batch, dict) else None
        if isinstance(batch, dict) and "skipped" in batch:
            self.tally.add(batch.pop("skipped"))
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self.position["epoch"]:
                self.position = {"epoch": trainer.current_epoch, "batches": 0}
                self._done, self._next = [[0, 0] for _ in range(self._readers)], 0
            self.position["batches"] += 1
            if stamp is not None:
                self._done[stamp["worker"]] = [int(stamp["batches"]), int(stamp["samples"])]
                self._next = (stamp["worker"] + 1) % stamp["workers"]
        return batch

    def _gather(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``mine``, by rank. Lightning builds a checkpoint on every rank (``dump_checkpoint``), so
        the ranks all get here together; with an explicit rank (a simulated job) there is only this one."""
        dist = torch.distributed
        if self._rank is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out: list = [None] * dist.get_world_size()
            dist.all_gather_object(out, mine)
            return out
        return [mine]

    def _epoch_done(self) -> bool:
        """Whether the last batch consumed was the last of its epoch. Lightning knows (its loader fetches one batch
        ahead), and a run resumed from a checkpoint taken there starts the next epoch."""
        loop = getattr(getattr(getattr(self, "trainer", None), "fit_loop", None), "epoch_loop", None)
        return bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False))

    def state_dict(self) -> dict[str, Any]:
        """The train position: epoch and batches consumed in it (the same on every rank) and whether that was the
        epoch's last batch, and for every rank each reader's position and the reader due next, and its skip
        counts."""
        mine = {"workers": self._readers, "next": self._next, "done": [list(d) for d in self._done],
                "skipped": dict(self.tally.totals)}
        return {"position": dict(self.position), "epoch_done": self._epoch_done(), "skipped": dict(self.tally.totals),
                "ranks": self._gather(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next train loader continues the saved epoch exactly where the checkpoint was taken
        (:class:`data.stages.Reader`), with the same number of ranks and loader workers as the run that wrote it.
        With another number (or a checkpoint written before readers' positions were saved) each reader skips an
        equal share of the consumed batches, counted as ``data.batch_size`` samples each: the same batches only if
        every reader read whole batches without corrupt samples and kept its shards, which another split does not
        (a warning says so)."""
        self.position = dict(state.get("position", self.position))
        rank, world = self.rank_world()
        ranks = state.get("ranks") or []
        mine = ranks[rank] if len(ranks) == world and rank < len(ranks) else None
        if mine is not None and mine["workers"] == self._readers and len(mine["done"]) == self._readers:
            self._done = [[int(b), int(n)] for b, n in mine["done"]]
            self._next = int(mine["next"])
            skipped = mine.get("skipped", {})
        else:
            if ranks:
                was = ranks[0]["workers"] if ranks else "?"
                warnings.warn(f"resuming with {world} rank(s) x {self._readers} loader worker(s), the checkpoint "
                              f"was written by {len(ranks)} x {was}: the rest of the epoch is approximate (each "
                              "reader skips an equal share of the consumed batches)")
            b, w, size = int(self.position["batches"]), self._readers, int(self.cfg.batch_size)
            self._done = [[len(range(i, b, w)), len(range(i, b, w)) * size] for i in range(w)]
            self._next = b % w
            skipped = state.get("skipped", {})
        if state.get("epoch_done"):  # the checkpoint's batch ended its epoch: Lightning starts the next one
            self.position = {"epoch": int(self.position["epoch"]) + 1, "batches": 0}
            self._done, self._next = [[0, 0] for _ in range(self._readers)], 0
        self._resume = {"epoch": int(self.position["epoch"]), "next": self._next,
                        "done": [list(d) for d in self._done]}
        for kind, n in skipped.items():
            if kind in self.tally.totals:
                self.tally.totals[kind] = int(n)

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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Logged at the start of the step whose row the loggers write (the tally already holds this batch's
        # counts): a checkpoint taken at the end of the step then holds the whole row (launch.trainer.ResumableLogs)
        tally = getattr(trainer.datamodule, "tally", None)
        stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        if tally is None or (stepped + 1) % max(1, trainer.log_every_n_steps):
            return
        for kind in SKIP_KINDS:  # every rank logs every kind, so the summing all-reduce lines up
            pl_module.log(f"data/skipped_{kind}", float(tally.totals[kind]), on_step=True, on_epoch=False,
                          reduce_fx="sum", sync_dist=True)

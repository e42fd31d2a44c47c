"""The stages of the data module's pipelines (data/datamodule.py puts them together).

Train: :class:`TrainShards` (shard order or draw) -> read -> :class:`SampleShuffle` -> :class:`Skip` (a resumed
pass) -> :class:`Decode` -> :class:`Batch` (+ :class:`Collate`) -> :class:`EpochLimit` (resampled), all sharing
one :class:`Reader`: the bookkeeping that makes every random stream a function of (data.seed, rank, reader, epoch)
and lets a resumed run continue each reader exactly where it stopped. Val: :class:`RankSplit` or
:class:`SampleSplit`, so every val sample is read once per validation.
"""
from __future__ import annotations

import hashlib
import random
from itertools import islice
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data.decode import SampleDecoder, SkipCounter, collate
from data.errors import DataError


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class RankSplit:
    """nodesplitter: every ``world``-th shard, starting at ``rank`` (picklable, so spawned workers work too)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        yield from islice(src, self.rank, None, self.world)


class SampleSplit:
    """Every reader scans all shards and keeps the samples of its slot among ranks x workers (small val sets)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        for i, sample in enumerate(src):
            if i % slots == slot:
                yield sample


def _seed64(text: str) -> int:
    """A 64-bit seed from a string (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Reader:
    """Bookkeeping of one copy of the train pipeline (one per DataLoader worker; the main process's with
    num_workers 0), shared by its stages: which epoch the current pass reads, which reader it plays, how far it got.

    Every random stream of a pass is a function of (data.seed, rank, reader, epoch) alone: the shard draw
    (resampled) or shard order (else: seed and epoch only, the same on every rank), the shuffle buffer, and each
    sample's crop/flip (also of its index in the pass). The position of a reader is (batches it yielded, raw samples
    its decoder consumed, corrupt ones included) in the epoch; every batch carries it (``batch["reader"]``).

    A resumed run's first pass starts from the checkpoint's positions: each reader skips the raw samples it had
    consumed (before decoding, so a skip is cheap) and the loader's round robin, which restarts at worker 0, is
    rotated: physical worker p plays reader (p + next) mod workers, ``next`` being the reader that was due. So the
    batches come in the uninterrupted run's order, with any number of workers.
    """

    def __init__(self, rank: int, world: int, seed: int, start_epoch: int = 0, resume: Optional[dict] = None):
        self.rank, self.world, self.seed = rank, world, seed
        self.start_epoch = start_epoch
        self.resume = resume  # {"next": reader due, "done": [[batches, samples] per reader]}
        self.passes = 0
        self.epoch = start_epoch
        self.worker, self.workers = 0, 1
        self.batches = self.samples = 0
        self.skip_samples = 0
        self.counter: Optional[SkipCounter] = None

    def begin_pass(self) -> None:
        if self.counter is not None:
            # skips after this reader's last batch of the previous epoch: they come with no batch of that epoch,
            # and a run resumed at the epoch's end would not read them again; counting them nowhere keeps the
            # counts of a resumed run equal to an uninterrupted one's
            self.counter.take()
        physical, workers = _worker()
        self.epoch = self.start_epoch + self.passes
        self.worker, self.workers = physical, workers
        skip_batches = self.skip_samples = 0
        if self.passes == 0 and self.resume is not None:
            self.worker = (physical + self.resume["next"]) % workers
            skip_batches, self.skip_samples = (int(n) for n in self.resume["done"][self.worker])
        self.passes += 1
        self.batches, self.samples = skip_batches, self.skip_samples

    def stream(self, what: str) -> str:
        return f"{self.seed}/{what}/{self.rank}/{self.worker}/{self.epoch}"

    def stamp(self) -> dict[str, int]:
        return {"worker": self.worker, "workers": self.workers, "batches": self.batches, "samples": self.samples}


class TrainShards(IterableDataset):
    """First stage: starts a pass of the reader, then yields its shards. Resampled: drawn with replacement, without
    end, from the reader's own stream. Otherwise: the epoch's permutation of the set (the same on every rank), split
    by rank, then by reader: every (rank, reader) reads a disjoint set of whole shards."""

    def __init__(self, urls: list[str], reader: Reader, resampled: bool):
        super().__init__()
        self.urls, self.reader, self.resampled = list(urls), reader, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        # not a generator: the pass begins when the pipeline is put together, before the later stages read the
        # reader's epoch and role
        r = self.reader
        r.begin_pass()
        if self.resampled:
            return self._draw(random.Random(r.stream("shards")))
        order = list(self.urls)
        random.Random(f"{r.seed}/order/{r.epoch}").shuffle(order)
        return iter([{"url": url} for url in order[r.rank::r.world][r.worker::r.workers]])

    def _draw(self, rng: random.Random) -> Iterator[dict[str, str]]:
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class SampleShuffle:
    """Shuffle buffer drawing from the reader's stream for the epoch: reproducible, different in every reader."""

    def __init__(self, bufsize: int, reader: Reader):
        self.bufsize, self.reader = bufsize, reader

    def __call__(self, src):
        rng = random.Random(self.reader.stream("shuffle"))
        return wds.filters._shuffle(src, self.bufsize, min(self.bufsize, 256), rng)


class Skip:
    """On the first pass of a resumed run: drops the raw samples this reader had consumed before the checkpoint, and
    the skip counts that reading them again produced (those were delivered with the batches before it)."""

    def __init__(self, reader: Reader, counter: SkipCounter):
        self.reader, self.counter = reader, counter

    def __call__(self, src):
        n = self.reader.skip_samples
        if n:
            src = iter(src)
            for _ in islice(src, n):
                pass
            self.counter.take()
        yield from src


class EpochLimit:
    """Ends each pass of an endless (resampled) stream when this reader has yielded ``batches`` batches in the epoch
    (a resumed pass counts those yielded before the checkpoint)."""

    def __init__(self, batches: int, reader: Reader):
        self.batches, self.reader = batches, reader

    def __call__(self, src):
        if self.reader.batches >= self.batches:
            return
        for batch in src:
            yield batch
            if self.reader.batches >= self.batches:
                return


class Decode:
    """The decoding stage: raw samples -> decoded ones, corrupt ones skipped (and counted by the decoder). Counts the
    raw samples consumed (the reader's position) and draws each sample's crop and flip from a generator seeded by
    the reader's stream and the sample's index in the pass.

    An endless (resampled) stream in which nothing decodes would never yield a batch, and the run would wait forever.
    Shards are drawn with replacement, so a set with g good samples out of n shows a run of more than ``20 n``
    skipped samples in a row with probability about exp(-20 g): after that many, this stage stops the run with a
    DataError instead (``samples``: the set's size, None when unknown, e.g. remote shards: no check)."""

    RUN_FACTOR = 20

    def __init__(self, decoder: SampleDecoder, samples: Optional[int], endless: bool, reader: Reader):
        self.decoder, self.reader = decoder, reader
        self.limit = self.RUN_FACTOR * samples if endless and samples else None

    def __call__(self, src):
        failed = 0
        random_augment = self.decoder.random_crop or self.decoder.random_flip
        generator = torch.Generator() if random_augment else None
        base = _seed64(self.reader.stream("augment"))
        for sample in src:
            if generator is not None:
                generator.manual_seed((base + self.reader.samples * 0x9E3779B97F4A7C15) % 2 ** 64)
            self.reader.samples += 1
            out = self.decoder(sample, generator)
            if out is not None:
                failed = 0
                yield out
                continue
            failed += 1
            if self.limit is not None and failed > self.limit:
                totals = ", ".join(f"{n} {k}" for k, n in self.decoder.counter.totals.items() if n)
                raise DataError(f"no sample of data.train decodes: {failed} skipped in a row in a set of "
                                f"{self.limit // self.RUN_FACTOR} ({totals}); check it with `python -m data inspect`")


class Batch:
    """Groups decoded samples into batches, collating a batch as soon as it is full (webdataset's ``batched``
    collates only when the next sample arrives, one sample late for the reader's position)."""

    def __init__(self, size: int, collate: "Collate", partial: bool):
        self.size, self.collate, self.partial = size, collate, partial

    def __call__(self, src):
        batch: list = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.size:
                yield self.collate(batch)
                batch = []
        if batch and self.partial:
            yield self.collate(batch)


class Collate:
    """Stacks a batch; in the train pipeline also stamps it with the reader's position (``batch["reader"]``)."""

    def __init__(self, counter: SkipCounter, reader: Optional[Reader] = None):
        self.counter, self.reader = counter, reader

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples, self.counter)
        if self.reader is not None:
            self.reader.batches += 1
            batch["reader"] = self.reader.stamp()
        return batch

"""Shard I/O: expanding shard patterns, writing tar shards atomically and reading them back in order.

Shards follow img2dataset's layout: every sample is a group of consecutive tar members ``KEY.EXT`` (``KEY.png``,
``KEY.txt``, ``KEY.json``, ``KEY.codes.npy``...). Tars are written with fixed metadata (mtime 0, uid/gid 0, no user
names) so the same samples always give the same bytes.
"""
from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from typing import Any, Iterator, Optional

import braceexpand

from core.files import atomic_file
from data.errors import DataError

SHARD_DIGITS = 6


def _is_url(part: str) -> bool:
    return part.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", part) is not None


def expand_pattern(pattern: str) -> list[str]:
    """Shard pattern -> list of shard urls, in pattern order.

    ``pattern`` is one or more parts joined with ``::``; each part is a brace pattern (``a/{000..009}.tar``),
    a glob (``a/*.tar``, sorted), a plain path, or a ``pipe:CMD`` / ``scheme://`` url (passed through untouched,
    after brace expansion). A local part that matches no file raises :class:`DataError`.
    """
    if not pattern or not str(pattern).strip():
        raise DataError("empty shard pattern: set data.train / data.val (e.g. 'shards/{000000..000009}.tar')")
    urls: list[str] = []
    for part in str(pattern).split("::"):
        part = part.strip()
        if not part:
            continue
        for item in braceexpand.braceexpand(part):
            if _is_url(item):
                urls.append(item)
                continue
            item = os.path.expanduser(item)
            if glob.has_magic(item):
                matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
                if not matches:
                    raise DataError(f"shard pattern '{part}' matches no file ({item})")
                urls += matches
            elif os.path.isfile(item):
                urls.append(item)
            else:
                raise DataError(f"shard pattern '{part}' matches no file ({item} does not exist)")
    if not urls:
        raise DataError(f"shard pattern '{pattern}' matches no file")
    return urls


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise DataError(f"shard fields must be bytes or str, got {type(value).__name__}")


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:0{SHARD_DIGITS}d}.tar"


def complete_shards(out_dir: str, prefix: str = "") -> list[int]:
    """Indices of the finished shards in ``out_dir`` (the hidden temporary file of an interrupted writer does not
    count)."""
    found = []
    rx = re.compile(re.escape(prefix) + r"(\d+)\.tar$")
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = rx.match(name)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def write_empty_shard(path: str) -> None:
    """An empty tar at ``path`` (written atomically): marks a shard whose inputs were all unusable as done."""
    with atomic_file(path, "wb") as fh:
        tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT).close()


class ShardWriter:
    """Write samples into ``out_dir/PREFIX000000.tar``, ``PREFIX000001.tar``... ``shard_size`` samples each.

    Each shard is written as ``NAME.tar.tmp`` and renamed when it is complete, so an interrupted run never
    leaves a shard that reads as valid. ``start_index`` numbers the first shard (resumable writers write the
    missing shards only; see :func:`complete_shards`). A sample is a dict with ``__key__`` and one entry per
    extension (bytes, or str for text), e.g. ``{"__key__": "000001", "txt": "a caption", "png": b"..."}``.
    """

    def __init__(self, out_dir: str, prefix: str = "", shard_size: int = 1000, start_index: int = 0):
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.index = start_index
        self.written: list[str] = []  # finished shard paths
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Any = None  # the atomic_file context of the shard being written
        self._count = 0
        os.makedirs(out_dir, exist_ok=True)

    def path(self, index: int) -> str:
        return os.path.join(self.out_dir, shard_name(index, self.prefix))

    def write(self, sample: dict[str, Any]) -> None:
        key = sample.get("__key__")
        if not key or "." in str(key) or "/" in str(key):
            raise DataError(f"sample key must be a non-empty name without '.' or '/', got {key!r}")
        if self._tar is None:
            self._file = atomic_file(self.path(self.index), "wb")
            self._tar = tarfile.open(fileobj=self._file.__enter__(), mode="w", format=tarfile.USTAR_FORMAT)
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            self._tar.addfile(*_member(f"{key}.{ext}", _as_bytes(value)))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.__exit__(None, None, None)
        self.written.append(self.path(self.index))
        self._tar, self._file, self._count = None, None, 0
        self.index += 1

    def close(self) -> None:
        self._finish()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # an error: leave no shard under its real name
            self._tar.close()
            self._file.__exit__(exc_type, exc, tb)
            self._tar, self._file = None, None


def count_samples(urls: list[str], stop_at: Optional[int] = None) -> int:
    """Number of samples (distinct keys) in local shards, from tar headers only; with ``stop_at``, counting stops at
    the first shard that brings the total to ``stop_at`` or more (enough to know there are that many)."""
    total = 0
    for url in urls:
        if stop_at is not None and total >= stop_at:
            break
        if _is_url(url):
            raise DataError(f"cannot count the samples of '{url}': set data.epoch_samples explicitly")
        keys = set()
        try:
            with tarfile.open(url, "r:") as tar:
                for info in tar:
                    if info.isreg():
                        keys.add(info.name.split(".", 1)[0])
        except (tarfile.TarError, EOFError, OSError):
            pass  # a truncated shard: count what is readable
        total += len(keys)
    return total


def read_stages(counter: Any) -> list:
    """webdataset stages turning a stream of ``{"url"}`` into raw samples, counting truncated/unreadable shards."""
    import webdataset as wds

    return [counter.check_shards, wds.tarfile_to_samples(handler=counter.handler)]


def iter_samples(pattern: str, mode: str = "images", image_size: int = 64,
                 caption_key: str = "txt") -> Iterator[dict[str, Any]]:
    """Decoded samples of ``pattern`` in a deterministic order (shard order, then tar order), no shuffling.

    Yields ``{"key", "caption", "image": (3,H,W) float in [-1,1]}`` (mode "images", center crop) or
    ``{"key", "caption", "codes": (h,w) long}`` (mode "codes"). Corrupt samples are skipped and counted (one
    warning per kind). For encoders and evaluation.
    """
    import webdataset as wds

    from data.decode import SampleDecoder, SkipCounter

    counter = SkipCounter(warn=True)
    decoder = SampleDecoder(mode, image_size, caption_key=caption_key, train=False, counter=counter)
    source = wds.DataPipeline(wds.SimpleShardList(expand_pattern(pattern)), *read_stages(counter))
    for sample in source:
        out = decoder(sample)
        if out is not None:
            yield out


def iter_captions(pattern: str, caption_key: str = "txt") -> Iterator[str]:
    """Captions of ``pattern`` in file order, decoded as training decodes them (:func:`data.decode.decode_caption`);
    only the caption members are decoded. A caption that is not UTF-8 and a truncated or unreadable shard are
    skipped and counted (one warning per kind), as in training and ``python -m data inspect``."""
    import webdataset as wds

    from data.decode import SkipCounter, decode_caption

    counter = SkipCounter(warn=True)
    source = wds.DataPipeline(wds.SimpleShardList(expand_pattern(pattern)), *read_stages(counter))
    for sample in source:
        raw = sample.get(caption_key)
        if raw is None:
            continue
        try:
            yield decode_caption(raw)
        except DataError as exc:
            counter.skip("caption", f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}: {exc}")

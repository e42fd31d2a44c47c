"""Sample decoding: image bytes -> RGB float tensors, ``.codes.npy`` -> LongTensor, and counting what is skipped.

Corrupt samples never crash a run: they are skipped and counted per kind (:data:`SKIP_KINDS`). A
:class:`SkipCounter` lives inside each data pipeline copy (one per DataLoader worker); every batch carries the
counts gathered since the previous batch under ``batch["skipped"]``, and :class:`SkipTally` in the main process sums
them and warns once per kind. That is how counts from worker processes reach the process that logs them.
"""
from __future__ import annotations

import io
import os
import tarfile
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CODES_EXT = "codes.npy"
# image: undecodable image | codes: unreadable codes array | caption: no caption member | missing: no image /
# codes member | truncated: a tar cut short (truncated member or header) | shard: a shard that cannot be opened
SKIP_KINDS = ("image", "codes", "caption", "missing", "truncated", "shard")


class SkipCounter:
    """Counts skipped samples per kind inside one pipeline copy; ``take()`` hands over what is new."""

    def __init__(self, warn: bool = False):
        self.warn = warn  # warn here (single-process readers) instead of in a SkipTally
        self.totals = dict.fromkeys(SKIP_KINDS, 0)
        self._new = dict.fromkeys(SKIP_KINDS, 0)
        self._notes = dict.fromkeys(SKIP_KINDS, "")
        self._noted: set[str] = set()
        self._truncated: set[str] = set()
        self._current = "?"  # the shard being read

    def skip(self, kind: str, detail: str) -> None:
        self.totals[kind] += 1
        self._new[kind] += 1
        if kind not in self._noted:  # the first example of each kind travels with the counts, for the warning
            self._noted.add(kind)
            self._notes[kind] = detail
            if self.warn:
                warnings.warn(f"skipping corrupt samples ({kind}): {detail}; further ones are only counted")

    def truncated(self, url: str) -> None:
        """Count a truncated shard once, however many errors reading it raises."""
        if url not in self._truncated:
            self._truncated.add(url)
            self.skip("truncated", f"shard {url} is cut short; its complete samples are kept")

    def check_shards(self, src: Iterator[dict]) -> Iterator[dict]:
        """Pipeline stage before the tar reader: flags truncated local shards.

        Python's tarfile ends silently when an archive is cut at a header, so a local shard is checked here: a
        complete tar is a whole number of 512-byte blocks and ends with two zero blocks.
        """
        for item in src:
            url = self._current = item["url"]
            if os.path.isfile(url) and not _tar_is_whole(url):
                self.truncated(url)
            yield item

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count and continue."""
        text = " ".join(str(a) for a in exn.args if isinstance(a, str))[:300]
        if isinstance(exn, (tarfile.TarError, EOFError)) or "unexpected end" in text:
            self.truncated(self._current)
        else:
            self.skip("shard", f"{type(exn).__name__}: {text}")
        return True

    def take(self) -> dict[str, Any]:
        packet = {"counts": torch.tensor([self._new[k] for k in SKIP_KINDS], dtype=torch.long),
                  "notes": [self._notes[k] for k in SKIP_KINDS]}
        self._new = dict.fromkeys(SKIP_KINDS, 0)
        self._notes = dict.fromkeys(SKIP_KINDS, "")
        return packet


def _tar_is_whole(path: str) -> bool:
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return not any(fh.read(1024))


class SkipTally:
    """Main-process totals of skipped samples, fed with the ``batch["skipped"]`` packets; warns once per kind."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(SKIP_KINDS, 0)
        self._warned: set[str] = set()

    def add(self, packet: dict[str, Any]) -> None:
        counts = packet["counts"].tolist() if torch.is_tensor(packet["counts"]) else list(packet["counts"])
        for kind, n, note in zip(SKIP_KINDS, counts, packet["notes"]):
            if not n:
                continue
            self.totals[kind] += int(n)
            if kind not in self._warned:
                self._warned.add(kind)
                warnings.warn(f"skipping corrupt samples ({kind}): {note or 'see data/skipped_' + kind}; "
                              "further ones are only counted (logged as data/skipped_" + kind + ")")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit greyscale scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_caption(raw: Any) -> str:
    """Caption bytes -> text: UTF-8 (a leading byte-order mark dropped), surrounding white space stripped.

    The one caption decoder of the project: training, ``python -m data prepare|inspect`` and the tokenizer trainer
    read captions through it, so they agree on which captions are usable. Bytes that are not UTF-8 raise
    :class:`DataError` saying where the first bad byte is; callers add which sample or file it was.
    """
    if isinstance(raw, str):
        return raw.strip()
    try:
        return bytes(raw).decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"caption is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` on bytes that refuses images over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) already at
    the header: PIL itself only warns below twice the limit and would then decode the whole image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"image of {img.width}x{img.height} pixels is over PIL's limit of "
                                           f"{limit} (Image.MAX_IMAGE_PIXELS): a decompression bomb or a wrong header")
    return img


def load_image(data: bytes, size: Optional[int] = None) -> Image.Image:
    """Decode image bytes to RGB. ``size`` lets JPEG decode at reduced scale (still >= size on both sides)."""
    img = open_image(data)
    if size and img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()
    return to_rgb(img)


def resize_crop(img: Image.Image, size: int, random_crop: bool = False,
                generator: Optional[torch.Generator] = None) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and crop a ``size`` square (center, or random: drawn from
    ``generator``, torch's global generator when None)."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        w, h = img.size
        if random_crop:
            left = int(torch.randint(0, w - size + 1, (), generator=generator))
            top = int(torch.randint(0, h - size + 1, (), generator=generator))
        else:
            left, top = (w - size) // 2, (h - size) // 2
        if (w, h) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_codes(data: bytes, codebook_size: Optional[int] = None,
                 grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``.codes.npy`` bytes -> (h, w) LongTensor; a non-2D or non-integer array is a DataError, and so are ids
    outside ``[0, codebook_size)`` or another grid than ``grid`` when they are given."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"codes must be a 2-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if grid is not None and tuple(arr.shape) != tuple(grid):
        raise DataError(f"code grid {tuple(arr.shape)} is not the expected {tuple(grid)}")
    if codebook_size is not None and arr.size and (int(arr.min()) < 0 or int(arr.max()) >= codebook_size):
        raise DataError(f"code ids span [{int(arr.min())}, {int(arr.max())}], outside the codebook's "
                        f"[0, {codebook_size})")
    return torch.from_numpy(arr.astype(np.int64))


class SampleDecoder:
    """Raw webdataset sample -> ``{"key", "caption", "image"|"codes"}``, or None (counted) when it is corrupt."""

    def __init__(self, mode: str, image_size: int = 64, caption_key: str = "txt", train: bool = False,
                 random_crop: bool = False, random_flip: bool = False, counter: Optional[SkipCounter] = None,
                 codebook_size: Optional[int] = None, grid: Optional[tuple[int, int]] = None):
        """``codebook_size``, ``grid`` (codes mode): samples with other ids or another grid are skipped (counted
        as "codes") instead of reaching the model."""
        if mode not in ("images", "codes"):
            raise DataError(f"data.mode must be 'images' or 'codes', got '{mode}'")
        self.mode, self.image_size, self.caption_key = mode, image_size, caption_key
        self.codebook_size, self.grid = codebook_size, (tuple(int(g) for g in grid) if grid is not None else None)
        self.random_crop, self.random_flip = train and random_crop, train and random_flip
        self.counter = counter or SkipCounter(warn=True)

    def __call__(self, sample: dict[str, Any], generator: Optional[torch.Generator] = None) -> Optional[dict[str, Any]]:
        """``generator``: where the random crop and flip are drawn from (torch's global generator when None); the
        training pipeline passes one seeded per sample, so a sample's augmentation does not depend on which process
        decodes it or on what was decoded before (data/datamodule.py)."""
        key = sample.get("__key__", "?")
        where = f"{key} in {sample.get('__url__', '?')}"
        raw = sample.get(self.caption_key)
        if raw is None:
            self.counter.skip("caption", f"no .{self.caption_key} for {where}")
            return None
        try:
            caption = decode_caption(raw)
        except DataError as exc:
            self.counter.skip("caption", f"{where}: {exc}")
            return None
        if self.mode == "codes":
            if CODES_EXT not in sample:
                self.counter.skip("missing", f"no .{CODES_EXT} for {where}")
                return None
            try:
                codes = decode_codes(sample[CODES_EXT], self.codebook_size, self.grid)
            except Exception as exc:  # numpy raises several types for a damaged .npy
                self.counter.skip("codes", f"{where}: {str(exc).splitlines()[0][:120]}")
                return None
            return {"key": key, "caption": caption, "codes": codes}
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            self.counter.skip("missing", f"no image member for {where}")
            return None
        try:
            img = resize_crop(load_image(sample[ext], self.image_size), self.image_size, self.random_crop, generator)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            self.counter.skip("image", f"{where}: {str(exc).splitlines()[0][:120]}")
            return None
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"key": key, "caption": caption, "image": image_to_tensor(img)}


def collate(samples: list[dict[str, Any]], counter: Optional[SkipCounter] = None) -> dict[str, Any]:
    """Stack decoded samples; ``batch["skipped"]`` carries the skip counts since the previous batch."""
    batch: dict[str, Any] = {"caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    field = "codes" if "codes" in samples[0] else "image"
    try:
        batch[field] = torch.stack([s[field] for s in samples])
    except RuntimeError:
        first: dict[tuple, str] = {}
        for s in samples:
            first.setdefault(tuple(s[field].shape), s["key"])
        shapes = ", ".join(f"{shape} (sample {key})" for shape, key in sorted(first.items()))
        raise DataError(f"samples in one batch have different {field} shapes: {shapes}") from None
    if counter is not None:
        batch["skipped"] = counter.take()
    return batch

"""Schema of the ``data:`` config section, shared by the three components (see configs/data/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # Shard sets: brace patterns ("shards/{000000..000099}.tar"), globs, local paths or "pipe:CMD" urls.
    # Several patterns can be joined with "::".
    train: str = ""
    val: str = ""
    mode: str = "images"  # images: {image, caption} | codes: {codes, caption}
    image_size: int = 64  # images are resized (shorter side) and cropped to this square size
    random_crop: bool = False  # train only; val always center-crops
    random_flip: bool = False  # horizontal flip, train only (off for the shapes set: positions have a side)
    batch_size: int = 32  # per device
    val_batch_size: Optional[int] = None  # defaults to batch_size
    num_workers: int = 0
    shuffle_buffer: int = 1000  # samples mixed across shards (0 = no sample shuffle)
    resampled: bool = False  # draw shards with replacement forever; epoch length set by epoch_samples
    epoch_samples: Optional[int] = None  # samples per epoch over all ranks (resampled mode; default: dataset size)
    caption_key: str = "txt"
    drop_last: bool = True  # train only; equal batch shapes on every rank
    seed: int = 0  # shard order, shuffle buffer and resampling streams (configs set it to ${seed}, the run seed)


def check_values(cfg: "DataConfig") -> None:
    """DataError naming the first ``data.`` setting out of range (no file is read)."""
    from data.errors import DataError

    if cfg.mode not in ("images", "codes"):
        raise DataError(f"data.mode must be 'images' or 'codes', got '{cfg.mode}'")
    for name, least in (("batch_size", 1), ("val_batch_size", 1), ("image_size", 1), ("num_workers", 0),
                        ("shuffle_buffer", 0), ("epoch_samples", 1)):
        value = getattr(cfg, name)
        if value is not None and int(value) < least:
            raise DataError(f"data.{name} must be >= {least}, got {value}")


def check_data(cfg: "DataConfig", world_size: int = 1) -> None:
    """What a run can check before it builds anything: the settings (:func:`check_values`), that ``data.train`` and
    ``data.val`` name existing shards, and that local training shards hold enough samples for one batch per rank
    (an epoch without a batch would repeat forever). Raises DataError with one line naming the setting."""
    from data.errors import DataError
    from data.shards import _is_url, count_samples, expand_pattern

    check_values(cfg)
    if not str(cfg.train or "").strip():
        raise DataError("data.train is not set: give the training shards, e.g. data.train='shards/{000000..000009}.tar'")
    found = {}
    for split in ("train", "val"):
        pattern = getattr(cfg, split)
        if split == "train" or pattern:
            try:
                found[split] = expand_pattern(pattern)
            except DataError as exc:
                raise DataError(f"data.{split}: {exc}") from None
    urls = found["train"]
    readers = max(1, int(cfg.num_workers))
    if not cfg.resampled and len(urls) < world_size * readers:
        raise DataError(f"data.train has {len(urls)} shard(s) but {world_size} rank(s) x {readers} worker(s) need at "
                        "least one each: write more/smaller shards, lower data.num_workers, or set "
                        "data.resampled=true")
    if any(_is_url(u) for u in urls):
        return  # remote shards are not counted here; an epoch without a batch stops the run at its end
    need = int(cfg.batch_size) * world_size if cfg.drop_last and not cfg.resampled else 1
    have = count_samples(urls, stop_at=need)
    if have == 0:
        raise DataError(f"data.train ({cfg.train}) holds no sample: {len(urls)} shard(s), all empty or unreadable")
    if have < need:
        raise DataError(f"data.train ({cfg.train}) holds {have} sample(s), fewer than one batch per rank "
                        f"(data.batch_size={cfg.batch_size} x {world_size} rank(s)) with data.drop_last=true, so an "
                        "epoch would have no batch: lower data.batch_size, or set data.drop_last=false or "
                        "data.resampled=true")

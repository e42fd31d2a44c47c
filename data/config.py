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

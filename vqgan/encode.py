"""Encode image shards into code shards with a trained VQGAN.

    python -m vqgan.encode --model DIR --input 'shards/train/*.tar' --output codes/train [--devices N] [--batch-size B]

Every input shard i becomes one output shard ``rankRR-iiiiii.tar`` holding ``KEY.codes.npy`` (uint16 h×w) and
``KEY.txt`` (the caption) for the same keys. Input shards are dealt round-robin to the ranks (``--devices`` local
processes, or the ranks of an external launcher via RANK/WORLD_SIZE). Shards are written atomically; a rerun skips
input shards whose output exists, whichever rank wrote it. ``manifest.json`` in the output folder records the
codebook size and token grid (the prior checks them at start-up); encoding into a folder that holds another VQGAN's
codes is refused, so one set never mixes two codebooks.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from core.errors import UserError
from core.files import atomic_file, read_json
from vqgan.model import CONFIG_NAME, VQGAN, VQGANConfig


class EncodeError(ValueError):
    pass


def output_name(rank: int, shard_index: int) -> str:
    return f"rank{rank:02d}-{shard_index:06d}.tar"


def done_shards(out_dir: str) -> set[int]:
    return {int(os.path.basename(p)[-10:-4]) for p in glob.glob(os.path.join(out_dir, "rank*-??????.tar"))}


def codes_to_npy(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes.astype(np.uint16), allow_pickle=False)
    return buf.getvalue()


def read_encoder_config(model_dir: str) -> VQGANConfig:
    """The config of the VQGAN in ``model_dir``; a one-line error unless it has an encoder."""
    cfg_path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: pass a VQGAN save_pretrained folder (e.g. runs/NAME/export)")
    cfg = VQGANConfig.from_dict(read_json(cfg_path), source=cfg_path)
    cfg.require_encoder(model_dir)
    return cfg


def write_manifest(model_dir: str, out_dir: str) -> dict:
    """Write (or check) ``out_dir/manifest.json``: the codebook size and token grid of the VQGAN in ``model_dir``."""
    cfg = read_encoder_config(model_dir)
    man = {"codebook_size": cfg.num_codes, "grid": [cfg.token_grid, cfg.token_grid],
           "vqgan": os.path.abspath(model_dir)}
    path = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(path):
        old = read_json(path)
        if (old.get("codebook_size"), old.get("grid")) != (man["codebook_size"], man["grid"]):
            raise EncodeError(f"{out_dir} holds codes of another VQGAN ({old.get('codebook_size')} codes, grid "
                              f"{old.get('grid')}; this one: {man['codebook_size']}, {man['grid']}): use a new --output")
        return old
    if done_shards(out_dir):
        raise EncodeError(f"{out_dir} holds code shards but no manifest.json (an older encoder or another tool wrote them): encode into a new --output folder")
    with atomic_file(path) as fh:
        json.dump(man, fh, indent=1)
    return man


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_shard(model: VQGAN, shard: str, out_dir: str, rank: int, index: int, batch_size: int,
                 device: torch.device, progress=None) -> int:
    """Encode one input shard into ``out_dir/rankRR-index.tar``; returns the number of samples written."""
    from data import ShardWriter, iter_samples
    from data.shards import write_empty_shard

    n = 0
    size = model.config.resolution
    with ShardWriter(out_dir, prefix=f"rank{rank:02d}-", shard_size=10 ** 9, start_index=index) as writer:
        for batch in _batches(iter_samples(shard, mode="images", image_size=size), batch_size):
            images = torch.stack([s["image"] for s in batch]).to(device)
            codes = model.encode(images).cpu().numpy()
            for s, c in zip(batch, codes):
                writer.write({"__key__": s["key"], "codes.npy": codes_to_npy(c), "txt": s["caption"]})
            n += len(batch)
            if progress is not None:
                progress.update(len(batch))
    if n == 0:  # an empty input shard still gets its (empty) output shard, so reruns skip it
        write_empty_shard(os.path.join(out_dir, output_name(rank, index)))
    return n


def run_rank(rank: int, world: int, model_dir: str, shards: list[str], out_dir: str, batch_size: int,
             threads: Optional[int] = None) -> int:
    from tqdm import tqdm

    from data import count_samples

    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    model = VQGAN.from_pretrained(model_dir).to(device).eval()
    if model.config.num_codes > 65536:
        raise EncodeError(f"{model.config.num_codes} codes do not fit the uint16 code shards")
    done = done_shards(out_dir)
    mine = [(i, s) for i, s in enumerate(shards) if i % world == rank and i not in done]
    local = [s for _, s in mine if "://" not in s and not s.startswith("pipe:")]
    total = count_samples(local) if len(local) == len(mine) else None
    written = 0
    with tqdm(total=total, desc=f"encode rank {rank}", unit="img", position=rank, disable=None) as bar:
        for i, shard in mine:
            written += encode_shard(model, shard, out_dir, rank, i, batch_size, device, bar)
    return written


def _spawned(rank: int, world: int, *args) -> None:
    run_rank(rank, world, *args)


def encode(model_dir: str, pattern: str, out_dir: str, devices: int = 1, batch_size: int = 64,
           threads: Optional[int] = None) -> list[str]:
    """Encode all shards of ``pattern``; returns the output shard paths (sorted). ``threads``: torch threads per CPU
    process (default: the cores split evenly between the processes)."""
    from data import expand_pattern

    if devices < 1 or batch_size < 1 or (threads is not None and threads < 1):
        raise EncodeError("--devices, --batch-size and --threads must be >= 1")
    read_encoder_config(model_dir)  # a decoder-only VQGAN is refused before any output folder is made
    shards = expand_pattern(pattern)
    os.makedirs(out_dir, exist_ok=True)
    if int(os.environ.get("RANK", 0)) == 0:
        write_manifest(model_dir, out_dir)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun / srun: one rank per process
        run_rank(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), model_dir, shards, out_dir, batch_size,
                 threads)
    elif devices == 1:
        run_rank(0, 1, model_dir, shards, out_dir, batch_size, threads)
    else:
        import torch.multiprocessing as mp

        mp.spawn(_spawned, args=(devices, model_dir, shards, out_dir, batch_size, threads), nprocs=devices, join=True)
    return sorted(glob.glob(os.path.join(out_dir, "rank*-??????.tar")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vqgan.encode", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a VQGAN save_pretrained folder (e.g. runs/NAME/export)")
    ap.add_argument("--input", required=True, help="image shard pattern, e.g. 'data/shapes/train/*.tar'")
    ap.add_argument("--output", required=True, help="folder for the code shards")
    ap.add_argument("--devices", type=int, default=1, help="local worker processes (one per GPU)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, help="torch threads per CPU process (default: cores / processes)")
    args = ap.parse_args(argv)
    try:
        out = encode(args.model, args.input, args.output, args.devices, args.batch_size, args.threads)
    except (EncodeError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --output under a regular file, a full disk...
        from data.errors import os_error

        print(f"error: {os_error(exc)}", file=sys.stderr)
        return 2
    print(f"{len(out)} code shards in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

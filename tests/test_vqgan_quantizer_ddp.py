"""The quantizer's EMA updates and dead-code restarts under 2-process DDP (gloo): every rank ends with the same
codebook, and the EMA codebook equals the one-process result on the global batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqgan.quantizer import VectorQuantizer

WORLD, STEPS = 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantizer(restart: bool) -> VectorQuantizer:
    torch.manual_seed(0)  # identical initial codebooks, as DDP's broadcast guarantees
    return VectorQuantizer(16, 4, ema=True, ema_decay=0.9, restart_dead=restart, restart_every=2,
                           restart_buffer=64).train()


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1000 * step + rank)) + rank


def _run(q: VectorQuantizer, rank: int) -> dict:
    torch.manual_seed(rank)  # restart picks differ per rank unless rank 0's choice is broadcast
    for step in range(STEPS):
        q(_batch(step, rank))
    return {"weight": q.embedding.weight.detach().clone(), "ema_count": q.ema_count.clone()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save({"ema": _run(_quantizer(False), rank), "restart": _run(_quantizer(True), rank)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ema_and_restarts_stay_in_sync_across_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for kind in ("ema", "restart"):
        assert torch.equal(r0[kind]["weight"], r1[kind]["weight"]), kind
        assert torch.equal(r0[kind]["ema_count"], r1[kind]["ema_count"]), kind
    # EMA statistics are all-reduced: the same as one process seeing both ranks' batches
    single = _quantizer(False)
    for step in range(STEPS):
        single(torch.cat([_batch(step, r) for r in range(WORLD)]))
    assert torch.allclose(single.embedding.weight, r0["ema"]["weight"], atol=1e-6)
    # restarts did happen (dead codes moved onto encoder outputs), identically on both ranks
    assert not torch.allclose(r0["restart"]["weight"], r0["ema"]["weight"])

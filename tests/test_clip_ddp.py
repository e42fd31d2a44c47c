"""The gathered contrastive loss under 2-process DDP (gloo) equals the single-process loss on the global batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _clip_helpers import one_thread, square_batch, tiny_cfg

WORLD = 2
GLOBAL_BATCH = 8
_single_thread = pytest.fixture(autouse=True)(one_thread)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module():
    from clip_rank.training import ClipModule

    torch.manual_seed(0)  # identical initial weights on every rank, as DDP's broadcast guarantees
    return ClipModule(tiny_cfg())


def _grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.model.clip.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        module = _module()
        batch = square_batch(GLOBAL_BATCH)
        per = GLOBAL_BATCH // WORLD
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        loss = module.training_step(local, 0)  # the module picks rank/world_size from the process group
        loss.backward()
        assert module.clip_loss().world_size == WORLD and module.clip_loss().rank == rank
        # what DDP does after backward: average gradients and (for the logged value) the loss over ranks
        grads = _grads(module)
        for g in grads.values():
            dist.all_reduce(g)
            g /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        if rank == 0:
            torch.save({"loss": mean_loss, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_gathered_loss_and_gradients_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ddp = torch.load(out, weights_only=True)

    module = _module()
    loss = module.training_step(square_batch(GLOBAL_BATCH), 0)
    loss.backward()
    single = _grads(module)

    torch.testing.assert_close(ddp["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    assert set(ddp["grads"]) == set(single)
    for name, g in single.items():
        torch.testing.assert_close(ddp["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)

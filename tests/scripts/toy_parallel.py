"""Train a toy ShardedModule with the project's trainer builder; print the final loss and export.

    python tests/scripts/toy_parallel.py STRATEGY DEVICES BATCH OUT_DIR

Every rank sees the same batches, so the mean gradient over ranks equals one process's gradient: the loss after
N steps must match across strategies.
"""
import json
import os
import sys

import torch
from torch import nn

from launch.config import RunConfig, load_config
from launch.run import RunDir
from launch.sharding import ShardedModule
from launch.train import export
from launch.trainer import build_trainer


class Toy(ShardedModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), *[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(3)],
                                 nn.Linear(32, 1))
        self.losses = []

    def fsdp_root(self):
        return self.net

    def fsdp_blocks(self):
        return list(self.net)[1:4]

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def export(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        torch.save({k: v.clone() for k, v in self.state_dict().items()}, os.path.join(out_dir, "state.pt"))


def main():
    strategy, devices, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = load_config(RunConfig, None, [f"trainer.strategy={strategy}", f"trainer.devices={devices}",
                                        "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.progress_bar=false",
                                        "trainer.checkpoint_every_n_steps=3"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6 * batch, 8, generator=g)
    y = x.sum(1, keepdim=True).sin()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    run = RunDir(out)
    trainer = build_trainer(cfg, run)
    module = Toy()
    trainer.fit(module, train_dataloaders=loader)
    export(module, trainer, os.path.join(out, "export"), rebuild=Toy)
    if trainer.is_global_zero:
        with open(os.path.join(out, "losses.json"), "w") as fh:
            json.dump(module.losses, fh)


if __name__ == "__main__":
    main()

"""Train one component for a few steps on fixed global batches; every rank takes its slice of each global batch.

    python tests/scripts/component_parallel.py COMPONENT STRATEGY DEVICES OUT_DIR DATA_PATTERN [key=value ...]

With DDP the gradient is the mean over ranks, so N steps on 2 ranks with half batches must land where 1 process
with the whole batches lands. Writes OUT_DIR/state.pt (the trained weights) on rank 0.
"""
import os
import sys

import torch

from data import iter_samples
from launch.components import get_component
from launch.config import load_config
from launch.run import RunDir
from launch.trainer import build_trainer

GLOBAL_BATCH, STEPS = 8, 4


class Slices(torch.utils.data.IterableDataset):
    def __init__(self, batches, rank, world):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        n = GLOBAL_BATCH // self.world
        for b in self.batches:
            yield {k: v[self.rank * n:(self.rank + 1) * n] for k, v in b.items()}

    def __len__(self):
        return len(self.batches)


def global_batches(pattern, mode, image_size):
    samples = list(iter_samples(pattern, mode=mode, image_size=image_size))[:GLOBAL_BATCH * STEPS]
    key = "image" if mode == "images" else "codes"
    return [{key: torch.stack([s[key] for s in samples[i:i + GLOBAL_BATCH]]),
             "caption": [s["caption"] for s in samples[i:i + GLOBAL_BATCH]],
             "key": [s["key"] for s in samples[i:i + GLOBAL_BATCH]]}
            for i in range(0, len(samples), GLOBAL_BATCH)]


def main():
    component, strategy, devices, out, pattern = sys.argv[1:6]
    comp = get_component(component)
    config = {"vqgan": "configs/vqgan/tiny.yaml", "bart_prior": "configs/bart_prior/tiny.yaml",
              "clip": "configs/clip_rank/tiny.yaml"}[component]
    cfg = load_config(comp.schema, config, [f"trainer.strategy={strategy}", f"trainer.devices={devices}",
                                            "trainer.accelerator=cpu", f"trainer.max_steps={STEPS}",
                                            "trainer.progress_bar=false", "trainer.limit_val_batches=0",
                                            f"trainer.checkpoint_every_n_steps={STEPS}", *sys.argv[6:]])
    torch.manual_seed(0)
    module = comp.build(cfg)
    trainer = build_trainer(cfg, RunDir(out), manual_optimization=comp.manual_optimization)
    batches = global_batches(pattern, comp.data_mode, cfg.data.image_size)

    class Fit(torch.utils.data.IterableDataset):  # rank known only inside the spawned process
        def __iter__(self):
            return iter(Slices(batches, trainer.global_rank, trainer.world_size))

        def __len__(self):
            return len(batches)

    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Fit(), batch_size=None))
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, os.path.join(out, "state.pt"))


if __name__ == "__main__":
    main()

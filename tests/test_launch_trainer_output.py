"""What a training run prints: Lightning's advice that does not apply to our runs is kept out of the log."""
import logging
import warnings

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from launch.config import RunConfig, load_config
from launch.run import RunDir
from launch.trainer import build_trainer


class _ManualStep(pl.LightningModule):
    """Steps its own optimizer, like the VQGAN with its generator and discriminator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.proj = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.proj(batch[0]).pow(2).mean()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_run_has_no_lightning_advice(tmp_path, caplog):
    cfg = load_config(RunConfig, None, ["trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.progress_bar=false",
                                        "trainer.checkpoint_every_n_steps=1"])
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(OmegaConf.create(OmegaConf.to_container(cfg)), RunDir(str(tmp_path / "run")),
                                manual_optimization=True)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=4)
        trainer.fit(_ManualStep(), train_dataloaders=data)
    assert trainer.global_step == 3 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "pre-optimization state" in m or "LeafSpec" in m], messages
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "litlogger" in m], logged
    assert any("GPU available" in m for m in logged), logged  # Lightning's own start-up facts still get through

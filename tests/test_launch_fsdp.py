"""FSDP2 (ModelParallelStrategy) on 2 CPU processes trains the prior and CLIP through train.py, and the export is the
same single-file format as an unsharded run's: it loads strictly into an unsharded model."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from _launch_helpers import make_data, run_train, train_cmd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("fsdp-data")))


@pytest.mark.parametrize("component", ["bart_prior", "clip"])
def test_fsdp_trains_and_exports_consolidated(component, data, tmp_path):
    run_train(train_cmd(component, data, str(tmp_path), "fsdp", "trainer.strategy=fsdp", "trainer.devices=2",
                        "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=4"))
    export = str(tmp_path / "fsdp" / "export")
    assert os.path.isdir(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")  # sharded (distributed) checkpoint
    if component == "bart_prior":
        from bart_prior import BartPrior

        model = BartPrior.from_pretrained(export)
        weights = load_file(os.path.join(export, "model.safetensors"))
        codes = model.generate(["a red circle"], num_candidates=2, seed=0)
        assert codes.shape == (1, 2, model.grid[0] * model.grid[1])
    else:
        from clip_rank import ClipRanker

        ranker = ClipRanker.from_pretrained(export)
        weights = load_file(os.path.join(export, "open_clip_model.safetensors"))
        scores = ranker.score("a red circle", torch.zeros(3, 3, 32, 32))
        assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert all(type(t) is torch.Tensor for t in weights.values())  # plain tensors, no DTensor shards


def test_vqgan_refuses_fsdp_at_start_up(repo_root):
    from launch.config import ConfigError
    from launch.train import resolve_config

    with pytest.raises(ConfigError, match="not supported for vqgan.*use trainer.strategy=ddp"):
        resolve_config("vqgan", os.path.join(repo_root, "configs/vqgan/tiny.yaml"), ["trainer.strategy=fsdp"])

"""ClipModule: locking, optimiser groups, temperature clamp, fine-tuning starts, learning, reconstructions."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from _clip_helpers import TINY_YAML, RepeatBatch, one_thread, square_batch, tiny_cfg
from clip_rank.io import PretrainedNotFoundError
from clip_rank.training import COMPONENT, ClipModule, param_groups, retrieval_metrics
from launch.schedule import lr_factor
from core.errors import ModelFolderError
from launch.config import ConfigError, load_config


_single_thread = pytest.fixture(autouse=True)(one_thread)


def _backward(module: ClipModule) -> None:
    batch = square_batch(8)
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()


def _grads(params) -> list:
    return [p.grad for _, p in params]


def test_component_and_required_pretrained():
    assert COMPONENT.name == "clip_rank" and COMPONENT.data_mode == "images" and COMPONENT.build is ClipModule
    with pytest.raises(ConfigError, match="pretrained"):
        load_config(COMPONENT.schema, None, ["model.arch.embed_dim=8"])


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_locked_towers_receive_no_gradient(tmp_path):
    module = ClipModule(tiny_cfg(str(tmp_path), ["model.lock_image=true"]))
    _backward(module)
    visual = list(module.model.clip.visual.named_parameters())
    text = [(n, p) for n, p in module.model.clip.named_parameters() if not n.startswith("visual.") and "logit" not in n]
    assert all(g is None for g in _grads(visual))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(text))

    module = ClipModule(tiny_cfg(str(tmp_path), ["model.lock_text=true", "model.lock_text_unlocked_layers=1"]))
    _backward(module)
    clip = module.model.clip
    assert clip.text_projection.grad is not None  # the last group (projection) stays free
    assert clip.token_embedding.weight.grad is None and clip.transformer.resblocks[0].attn.in_proj_weight.grad is None
    assert all(p.grad is not None for p in clip.visual.parameters())
    groups = module.configure_optimizers()["optimizer"].param_groups
    trainable = {id(p) for g in groups for p in g["params"]}
    assert id(clip.token_embedding.weight) not in trainable and id(clip.text_projection) in trainable


def test_weight_decay_groups_and_schedule(tmp_path):
    module = ClipModule(tiny_cfg(str(tmp_path)))
    decay, no_decay = param_groups(module.model.clip, 0.1)
    names = {id(p): n for n, p in module.model.clip.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for n in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
              "visual.positional_embedding", "ln_final.weight", "ln_final.bias", "visual.ln_post.bias"):
        assert n in no_decay_names, n
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in decay_names
    assert all(not n.endswith(".bias") and "ln" not in n for n in decay_names)
    f = lr_factor(10, 110, "cosine", 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_retrieval_metrics_exact():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["i2t_R@1"].tolist() == [1, 1, 0, 0] and m["t2i_R@1"].tolist() == [1, 1, 0, 0]
    assert m["i2t_R@2"].tolist() == [1, 1, 1, 1] and m["pos_cosine"].tolist() == [1, 1, 0, 0]
    # identical captions are interchangeable: retrieving the twin counts
    same = retrieval_metrics(img, txt, captions=["a", "b", "c", "c"], ks=(1,))
    assert same["i2t_R@1"].tolist() == [1, 1, 1, 1] and same["t2i_R@1"].tolist() == [1, 1, 1, 1]
    assert retrieval_metrics(img, txt, captions=["a", "b", "c", "d"], ks=(1,))["t2i_R@1"].tolist() == [1, 1, 0, 0]


def test_finetuning_starts_from_saved_weights(tmp_path):
    trained = ClipModule(tiny_cfg(str(tmp_path)))
    with torch.no_grad():
        trained.model.clip.logit_scale.fill_(3.0)
    folder = trained.export(str(tmp_path / "export"))
    for overrides in ([f"init_from={folder}"], [f"model.pretrained={folder}"]):
        tuned = ClipModule(tiny_cfg(str(tmp_path), overrides))
        for (name, a), b in zip(trained.model.clip.state_dict().items(), tuned.model.clip.state_dict().values()):
            assert torch.equal(a, b), name
    fresh = ClipModule(tiny_cfg(str(tmp_path), ["seed=1"]))
    assert not torch.equal(fresh.model.clip.visual.proj, trained.model.clip.visual.proj)
    with pytest.raises(PretrainedNotFoundError, match="nothing at"):
        ClipModule(tiny_cfg(str(tmp_path), [f"model.pretrained={tmp_path}/missing.pt"]))
    with pytest.raises(ModelFolderError, match="missing: no such folder; init_from takes a CLIP"):
        ClipModule(tiny_cfg(str(tmp_path), [f"init_from={tmp_path}/missing"]))
    with pytest.raises(ModelFolderError, match="init_from .*: tensor '.*' has shape"):  # another architecture
        ClipModule(tiny_cfg(str(tmp_path), [f"init_from={folder}", "model.arch.embed_dim=16"]))
    with pytest.raises(PretrainedNotFoundError, match="reconstruct_with"):
        ClipModule(tiny_cfg(str(tmp_path), [f"model.reconstruct_with={tmp_path}/no_vqgan"]))


def test_a_few_steps_raise_matching_similarity(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(str(tmp_path), ["trainer.max_steps=30", "optim.warmup_steps=3", "optim.lr=1e-3"])
    module = ClipModule(cfg)
    batch = square_batch(16)
    with torch.no_grad():
        before = retrieval_metrics(*module.model(batch["image"], batch["caption"])[:2])
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=30, num_sanity_val_steps=0)
    loader = DataLoader(RepeatBatch(batch, 30), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(RepeatBatch(batch, 1), batch_size=None))
    module.eval()
    with torch.no_grad():
        after = retrieval_metrics(*module.model(batch["image"], batch["caption"])[:2])
    assert after["pos_cosine"].mean() > before["pos_cosine"].mean() + 0.3
    assert after["t2i_R@1"].mean() >= 0.75 > before["t2i_R@1"].mean()
    logged = trainer.callback_metrics
    for key in ("val/loss", "val/i2t_R@1", "val/t2i_R@5", "val/t2i_R@10", "val/pos_cosine", "train/loss"):
        assert key in logged, key
    assert logged["val/pos_cosine"] == pytest.approx(after["pos_cosine"].mean().item(), abs=1e-4)


def test_temperature_is_clamped_after_updates(tmp_path):
    module = ClipModule(tiny_cfg(str(tmp_path)))
    with torch.no_grad():
        module.model.clip.logit_scale.fill_(math.log(150.0))
    module.optimizer_step(0, 0, torch.optim.SGD(module.parameters(), lr=0.0), lambda: None)  # Lightning's update
    assert module.model.logit_scale().item() == pytest.approx(100.0)


class _HalfReconstructor(torch.nn.Module):
    """Stands in for a VQGAN: 'codes' are the images, decoding halves them (a visible, checkable change)."""

    def encode(self, images):
        return images

    def decode(self, codes):
        return codes * 0.5


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_reconstruction_replaces_the_configured_fraction(tmp_path):
    module = ClipModule(tiny_cfg(str(tmp_path)))
    module._reconstructor = [_HalfReconstructor()]
    images = torch.rand(400, 3, 8, 8) * 0.5 + 0.5
    torch.manual_seed(0)
    out = module.reconstruct(images, 0.25)
    replaced = (out - images).abs().flatten(1).amax(1) > 0
    assert torch.equal(out[replaced], images[replaced] * 0.5) and torch.equal(out[~replaced], images[~replaced])
    assert 0.18 < replaced.float().mean() < 0.32
    assert torch.equal(module.reconstruct(images, 1.0), images * 0.5)
    assert torch.equal(module.reconstruct(images, 0.0), images)
    assert "_reconstructor" not in dict(module.named_children())


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_reconstructions_from_a_saved_vqgan_folder(tmp_path):
    vqgan = pytest.importorskip("vqgan")
    torch.manual_seed(0)
    vq = vqgan.VQGAN(vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=[1, 2], z_channels=8, embed_dim=8,
                                       num_codes=16, norm_groups=4, mid_attention=False))
    vq.save_pretrained(str(tmp_path / "vq"))
    module = ClipModule(tiny_cfg(str(tmp_path), [f"model.reconstruct_with={tmp_path}/vq"]))
    batch = square_batch(4)
    with torch.no_grad():
        expected = vq.eval().decode(vq.encode(batch["image"])).clamp(-1, 1)
    torch.testing.assert_close(module.reconstruct(batch["image"], 1.0), expected)
    assert all(not n.startswith("_reconstructor") for n in module.state_dict())
    module.validation_step(batch, 0)  # originals and reconstructions both evaluate


def test_train_command_end_to_end_exports_an_open_clip_folder(tmp_path):
    """`python train.py clip --config configs/clip_rank/tiny.yaml` on real shards, through the shared launcher."""
    import io

    import open_clip
    from PIL import Image

    from data import ShardWriter
    from launch.train import run_training

    batch = square_batch(32)
    for split, keys in (("train", range(24)), ("val", range(24, 32))):
        with ShardWriter(str(tmp_path / split), shard_size=8) as writer:
            for i in keys:
                buf = io.BytesIO()
                pixels = ((batch["image"][i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
                Image.fromarray(pixels).save(buf, format="PNG")
                writer.write({"__key__": f"k{i:03d}", "txt": batch["caption"][i], "png": buf.getvalue()})
    result = run_training("clip", TINY_YAML, [
        f"runs_dir={tmp_path}/runs", f"data.train={tmp_path}/train/*.tar", f"data.val={tmp_path}/val/*.tar",
        "data.batch_size=8", "data.num_workers=0", "data.resampled=true", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "trainer.progress_bar=false", "trainer.limit_val_batches=1"])
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{result.export_dir}")
    assert model.visual.image_size == (32, 32)
    assert "val/t2i_R@1" in result.trainer.callback_metrics

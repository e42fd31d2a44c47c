"""precision "auto": bf16 only where this machine computes it fast (launch/hardware.py), for training and sampling;
attention "auto": the math kernel where the flash kernel's backward is slow (a CPU in bf16)."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend

from bart_prior.sampling import resolve_precision
from launch.config import ConfigError, RunConfig, load_config
from core.hardware import attention_backends, bf16_is_fast, resolve_trainer_precision
from launch.run import RunDir
from launch.trainer import build_trainer


@pytest.fixture(params=[False, True], ids=["avx2-cpu", "avx512bf16-cpu"])
def cpu_bf16(request, monkeypatch):
    """Pretend this CPU lacks / has AVX512-bf16 (and no AMX)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: request.param, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    return request.param


def test_auto_follows_the_cpu(cpu_bf16):
    assert bf16_is_fast("cpu") is cpu_bf16
    assert bf16_is_fast(torch.device("cpu")) is cpu_bf16
    assert resolve_trainer_precision("auto", "cpu") == ("bf16-mixed" if cpu_bf16 else "32-true")
    # sampling: bf16 on such a CPU only for batches with enough work (below, the conversions cost more than they save)
    assert resolve_precision("auto", torch.device("cpu"), rows=32) == ("bf16" if cpu_bf16 else "fp32")  # 1024 wide
    assert resolve_precision("auto", torch.device("cpu"), rows=2) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), rows=32, d_model=128) == "fp32"  # the shapes prior
    assert resolve_precision("auto", torch.device("cpu"), rows=256, d_model=128) == ("bf16" if cpu_bf16 else "fp32")


def test_explicit_precision_is_kept(cpu_bf16):
    for value in ("32-true", "bf16-mixed", "bf16-true"):
        assert resolve_trainer_precision(value, "cpu") == value
    assert resolve_precision("bf16", torch.device("cpu"), rows=2) == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_gpu_without_cuda_is_not_fast():
    assert not bf16_is_fast("gpu") and not bf16_is_fast("cuda:0")
    assert resolve_trainer_precision("auto", "gpu") == "32-true"


def test_trainer_gets_the_resolved_precision(cpu_bf16, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer: {accelerator: cpu, precision: auto, progress_bar: false}\n")
    cfg = load_config(RunConfig, str(path), [])
    assert cfg.trainer.precision == "auto"
    trainer = build_trainer(OmegaConf.create(OmegaConf.to_container(cfg)), RunDir(str(tmp_path / "run")))
    assert trainer.precision == ("bf16-mixed" if cpu_bf16 else "32-true")


def test_attention_kernel_choice():
    assert attention_backends("auto", "cpu", "bf16-mixed") == [SDPBackend.MATH]
    assert attention_backends("auto", "cpu", "bf16-true") == [SDPBackend.MATH]
    assert attention_backends("auto", "cpu", "32-true") is None  # fp32: the flash kernel is as fast or faster
    assert attention_backends("auto", "gpu", "bf16-mixed") is None
    assert attention_backends("default", "cpu", "bf16-mixed") is None
    assert attention_backends("flash", "cpu", "bf16-mixed") == [SDPBackend.FLASH_ATTENTION]
    with pytest.raises(ValueError, match="trainer.attention must be auto, default or one of math"):
        attention_backends("fast", "cpu", "bf16-mixed")


class _AttentionProbe(pl.LightningModule):
    """Records which kernel the attention of its training step ran (the autograd node names the flash kernel)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.kernels = []

    def training_step(self, batch, batch_idx):
        x = self.proj(batch[0]).view(2, 2, 8, 16)
        out = F.scaled_dot_product_attention(x, x, x)
        self.kernels.append(out.grad_fn.name())
        return out.float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _kernel_in_training(tmp_path, attention: str) -> str:
    cfg = load_config(RunConfig, None, ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "trainer.max_steps=1",
                                        "trainer.progress_bar=false", f"trainer.attention={attention}"])
    trainer = build_trainer(OmegaConf.create(OmegaConf.to_container(cfg)), RunDir(str(tmp_path / attention)))
    probe = _AttentionProbe()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 32, 16)), batch_size=None)
    trainer.fit(probe, train_dataloaders=data)
    return probe.kernels[0]


def test_training_uses_the_chosen_kernel_and_restores_torchs(tmp_path):
    assert "Flash" not in _kernel_in_training(tmp_path, "auto")  # a CPU in bf16: the math kernel
    assert "Flash" in _kernel_in_training(tmp_path, "default")
    # after the fit, torch's own choice again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.randn(2, 2, 8, 16, requires_grad=True)
        assert "Flash" in F.scaled_dot_product_attention(q, q, q).grad_fn.name()
    with pytest.raises(ConfigError, match="trainer.attention"):
        _kernel_in_training(tmp_path, "fast")


def test_bad_attention_value_stops_before_the_run_folder(repo_root, tmp_path):
    from launch.train import resolve_config

    with pytest.raises(ConfigError, match="trainer.attention must be auto, default or one of"):
        resolve_config("clip", f"{repo_root}/configs/clip_rank/tiny.yaml",
                       ["trainer.attention=fast", f"runs_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())

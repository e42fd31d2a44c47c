"""precision "auto": bf16 only where this machine computes it fast (launch/hardware.py), for training and sampling."""
import pytest
import torch
from omegaconf import OmegaConf

from bart_prior.sampling import resolve_precision
from launch.config import RunConfig, load_config
from launch.hardware import bf16_is_fast, resolve_trainer_precision
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

"""optim.channels_last: auto: the VQGAN's training layout is decided per device in core/hardware.py (NHWC on GPUs and
AVX512 CPUs, NCHW on AVX2 CPUs, where the NHWC backward pass measured slow); true/false are kept; anything else is
refused at start-up. bench/vqgan_step.py shows both layouts and taming's own step."""
from __future__ import annotations

import pytest
import torch

from core.hardware import resolve_channels_last
from tests._vqgan_helpers import tiny_run_config


@pytest.fixture(params=["AVX2", "AVX512"])
def capability(request, monkeypatch):
    """Pretend torch's CPU kernels run with this instruction set."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: request.param)
    return request.param


def test_auto_is_nhwc_on_gpus_and_avx512_cpus_and_nchw_on_avx2_cpus(capability):
    avx512 = capability == "AVX512"
    assert resolve_channels_last("auto", "gpu") is True
    assert resolve_channels_last("auto", "cuda:1") is True
    assert resolve_channels_last("auto", "cpu") is avx512
    assert resolve_channels_last("auto", "auto") is (torch.cuda.is_available() or avx512)
    for accelerator in ("cpu", "gpu"):
        assert resolve_channels_last(True, accelerator) is True
        assert resolve_channels_last(False, accelerator) is False
    with pytest.raises(ValueError, match="true, false or auto, got 'yes'"):
        resolve_channels_last("yes", "cpu")


@pytest.mark.parametrize("value, nhwc", [("auto", None), ("true", True), ("false", False)])
def test_the_module_trains_in_the_resolved_layout(tmp_path, value, nhwc, capability):
    from vqgan.training import VQGANModule

    nhwc = capability == "AVX512" if nhwc is None else nhwc
    module = VQGANModule(tiny_run_config(tmp_path, "trainer.accelerator=cpu", f"optim.channels_last={value}"))
    assert module.channels_last is nhwc
    weight = module.vqgan.decoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is nhwc or weight.shape[-1] == 1
    x = module._images({"image": torch.zeros(2, 3, 32, 32)})
    assert x.is_contiguous(memory_format=torch.channels_last) is nhwc


def test_a_bad_value_is_refused_at_start_up(tmp_path):
    from launch.config import ConfigError
    from launch.train import resolve_config
    from tests._vqgan_helpers import TINY_YAML

    with pytest.raises(ConfigError, match="optim.channels_last must be true, false or auto"):
        resolve_config("vqgan", TINY_YAML, [f"runs_dir={tmp_path}", "optim.channels_last=sometimes"],
                       check_files=False)
    assert not (tmp_path / "vqgan_tiny").exists()


def test_the_shipped_cpu_configs_leave_the_layout_to_auto():
    from launch.config import load_config
    from vqgan.training import VQGANRunConfig

    for name in ("shapes", "emoji", "tiny", "f16-16384"):
        cfg = load_config(VQGANRunConfig, f"configs/vqgan/{name}.yaml", [])
        assert cfg.optim.channels_last == "auto", name


def test_bench_times_both_layouts_in_one_process():
    from bench.vqgan_step import bench_one

    rows = bench_one("tiny", "fp32", 1, "cpu", "both", None, False)
    assert [r["variant"] for r in rows] == ["ours NCHW", "ours NHWC"]
    assert rows[0]["gflop_per_step"] == rows[1]["gflop_per_step"] > 0 and rows[0]["speed_vs_first"] == 1.0
    auto = bench_one("tiny", "fp32", 1, "cpu", "auto", None, True)
    layout = "NHWC" if resolve_channels_last("auto", "cpu") else "NCHW"
    assert [r["variant"] for r in auto] == [f"encode+decode {layout}"]


def test_taming_step_runs_lightning_1_style_two_generator_forwards():
    """bench/_taming.py: taming's own VQModel and loss, importable without taming.main, stepped once per optimizer
    (each with its own generator forward), both optimizers moving their own parameters only."""
    from bench import _taming

    torch.manual_seed(0)
    dd = dict(_taming.F16_DDCONFIG, resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
              z_channels=32)  # taming's GroupNorm has 32 groups

    model, (opt_ae, opt_d) = _taming.build_model(dd, n_embed=16, embed_dim=32,
                                                 loss=dict(_taming.F16_LOSS, disc_ndf=8, perceptual_weight=0.0))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    enc = model.encoder.conv_in.weight.detach().clone()
    disc = next(model.loss.discriminator.parameters()).detach().clone()
    _taming.training_step(model, [opt_ae, opt_d], torch.rand(2, 3, 32, 32) * 2 - 1, global_step=1)
    assert len(calls) == 2
    assert not torch.equal(enc, model.encoder.conv_in.weight) and not torch.equal(
        disc, next(model.loss.discriminator.parameters()))
    assert all(p.requires_grad for p in model.encoder.parameters())  # toggling undone

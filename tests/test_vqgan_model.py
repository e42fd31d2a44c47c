"""VQGAN model: taming layout and conversion, quantizer behaviour, save/load, encode/decode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests._vqgan_helpers import one_thread  # noqa: F401  (autouse fixture)
from core.errors import ModelFolderError
from vqgan import VQGAN, CheckpointError, VectorQuantizer, preset
from vqgan.convert_taming import main as convert_main

TAMING_YAML = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 32
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 0, disc_weight: 0.75}
"""


def test_f16_preset_has_taming_parameter_names_and_shapes():
    sd = VQGAN(preset("f16-16384")).state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (16384, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.4.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert not any(k.startswith("quantize.") and k != "quantize.embedding.weight" for k in sd)  # plain codebook


def _taming_files(tmp_path):
    from vqgan.convert_taming import config_from_taming

    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(TAMING_YAML)
    torch.manual_seed(0)
    ref = VQGAN(config_from_taming(str(yaml_path))).eval()
    state = dict(ref.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # dropped by the converter
    return ref, state, yaml_path


def test_convert_taming_roundtrip_decodes_identically(tmp_path):
    ref, state, yaml_path = _taming_files(tmp_path)
    assert any(".attn." in k for k in state) and ref.config.legacy_commitment
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "last.ckpt")
    torch.save(state, tmp_path / "bare.pth")
    codes = torch.randint(0, 32, (2, 8, 8))
    ref = ref.to(memory_format=torch.channels_last)  # from_pretrained's layout: the same kernels, the same bits
    for ckpt in ("last.ckpt", "bare.pth"):
        out = tmp_path / f"out-{ckpt}"
        assert convert_main(["--checkpoint", str(tmp_path / ckpt), "--config", str(yaml_path), "--out", str(out)]) == 0
        model = VQGAN.from_pretrained(str(out))
        assert torch.equal(model.decode(codes), ref.decode(codes))
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.equal(model.encode(x), ref.encode(x))


def test_convert_taming_mismatch_names_the_key(tmp_path, capsys):
    _, state, yaml_path = _taming_files(tmp_path)
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    assert convert_main(["--checkpoint", str(tmp_path / "bad.pth"), "--config", str(yaml_path),
                         "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "decoder.conv_out.weight" in err and len(err.splitlines()) == 1
    del state["decoder.conv_out.weight"]
    torch.save(state, tmp_path / "missing.pth")
    assert convert_main(["--checkpoint", str(tmp_path / "missing.pth"), "--config", str(yaml_path),
                         "--out", str(tmp_path / "o")]) == 2
    assert "missing tensor 'decoder.conv_out.weight'" in capsys.readouterr().err


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = VQGAN(preset("tiny"))
    xrec, q = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    xrec.pow(2).mean().backward()  # reconstruction only: the path back to the encoder is the straight-through one
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.proj_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("legacy", [False, True])
def test_commitment_loss_form_by_value(legacy):
    vq = VectorQuantizer(2, 2, beta=0.25, legacy=legacy)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    vectors = torch.tensor([[0.2, 0.0], [0.9, 1.4]])  # nearest codes: 0 and 1
    z = vectors.t().reshape(1, 2, 1, 2).clone().requires_grad_(True)  # NCHW, two positions
    flat = vectors
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    mse = float(((flat - e) ** 2).mean())
    out = vq(z)
    expected = mse + 0.25 * mse  # same value; which term carries beta shows in the gradients
    assert float(out.loss.detach()) == pytest.approx(expected)
    out.loss.backward()
    # d/dz of the commitment term: correct form beta * 2(z-e)/N, legacy 2(z-e)/N
    grad = z.grad.permute(0, 2, 3, 1).reshape(-1, 2)
    scale = 1.0 if legacy else 0.25
    assert torch.allclose(grad, scale * 2 * (flat - e) / flat.numel())
    g_code = vq.embedding.weight.grad
    code_scale = 0.25 if legacy else 1.0
    assert torch.allclose(g_code, code_scale * 2 * (e - flat) / flat.numel())


def test_ema_moves_codes_to_assigned_means():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=True, ema_decay=0.5).train()
    assert not vq.embedding.weight.requires_grad
    before = vq.embedding.weight.clone()
    z = torch.full((1, 2, 4, 4), 3.0)
    idx = vq(z).indices.flatten()
    code = int(idx[0])
    assert (idx == code).all()
    after = vq.embedding.weight
    assert float((after[code] - 3.0).norm()) < float((before[code] - 3.0).norm())  # pulled towards the data
    untouched = [i for i in range(4) if i != code]
    assert torch.allclose(after[untouched], before[untouched] * 1.0, rtol=0.6)  # only decayed counts, no data pull
    for _ in range(30):
        vq(z)
    assert torch.allclose(vq.embedding.weight[code], torch.full((2,), 3.0), atol=1e-2)


def test_dead_code_restart_moves_unused_codes_onto_recent_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, restart_dead=True, restart_every=3, restart_buffer=64).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[5.0, 5.0]] + [[100.0 + i, -100.0] for i in range(7)]))
    z = torch.randn(2, 2, 4, 4) * 0.1 + 5.0
    for _ in range(3):  # all vectors hit code 0; the third call triggers the restart
        vq(z)
    w = vq.embedding.weight
    assert torch.equal(w[0], torch.tensor([5.0, 5.0]))  # the used code stays
    assert (w[1:] - 5.0).abs().max() < 1.0  # dead codes now sit among recent encoder outputs
    assert len({tuple(r.tolist()) for r in w[1:]}) == 7  # and do not coincide


def test_usage_window_and_perplexity():
    vq = VectorQuantizer(16, 2, usage_window=64)
    vq.usage.update(torch.arange(8).repeat(4))
    s = vq.usage.stats()
    assert s["usage"] == pytest.approx(0.5) and s["perplexity"] == pytest.approx(8.0, rel=1e-5)
    vq.usage.update(torch.full((64,), 3))  # the window forgets older indices
    assert vq.usage.stats() == {"usage": pytest.approx(1 / 16), "perplexity": pytest.approx(1.0)}


def test_encode_decode_shapes_and_save_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(preset("tiny")).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    img = model.decode(codes)
    assert img.shape == (3, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    model.save_pretrained(str(tmp_path / "m"))
    model.save_pretrained(str(tmp_path / "m"))  # overwriting an export is atomic too
    loaded = VQGAN.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    # loaded NHWC (faster CPU convolutions): the same codes, pixels within float rounding
    assert loaded.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(loaded.encode(x), codes) and (loaded.decode(codes) - img).abs().max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded.save_pretrained(str(tmp_path / "again"))  # re-exported in the usual contiguous layout
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(again[k].is_contiguous() and torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_give_clear_errors(tmp_path):
    model = VQGAN(preset("tiny"))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ModelFolderError, match="nothing: no such folder; pass a folder written by "
                                               "VQGAN.save_pretrained"):
        VQGAN.from_pretrained(str(tmp_path / "nothing"))
    model.save_pretrained(str(tmp_path / "m"))
    other = VQGAN(preset("tiny", num_codes=32))
    other.config = model.config
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        VQGAN.from_pretrained(str(tmp_path / "m"))

"""VQGAN model: taming layout, quantizer behaviour, save/load, encode/decode, decoder-only models, pixel range
and GroupNorm epsilon (conversion: test_vqgan_convert.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests._vqgan_helpers import one_thread  # noqa: F401  (autouse fixture)
from core.errors import ModelFolderError
from vqgan import VQGAN, CheckpointError, VectorQuantizer, preset

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


def test_decoder_only_model_decodes_round_trips_and_refuses_to_encode(tmp_path, capsys):
    from vqgan.encode import main as encode_main

    torch.manual_seed(0)
    full = VQGAN(preset("tiny")).eval()
    model = VQGAN(preset("tiny", encoder=False)).eval()
    assert model.encoder is None and model.quant_conv is None
    assert set(model.state_dict()) == {k for k in full.state_dict() if not k.startswith(("encoder.", "quant_conv."))}
    codes = torch.randint(0, 64, (2, 8, 8))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = VQGAN.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config and not loaded.config.encoder
    assert (loaded.decode(codes) - model.decode(codes)).abs().max() < 1e-5
    for m in (model, loaded):
        with pytest.raises(ModelFolderError, match="imported without an encoder .*min-dalle's detoker.pt.*"
                                                   "--from dalle-mini"):
            m.encode(torch.zeros(1, 3, 32, 32))
    rc = encode_main(["--model", str(tmp_path / "m"), "--input", str(tmp_path / "shards" / "*.tar"),
                      "--output", str(tmp_path / "codes")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "without an encoder" in err and str(tmp_path / "m") in err
    assert not (tmp_path / "codes").exists()


def test_pixel_range_converts_at_the_edges_and_norm_eps_reaches_every_norm():
    torch.manual_seed(0)
    a = VQGAN(preset("tiny")).eval()
    b = VQGAN(preset("tiny", pixel_range="0,1", norm_eps=1e-5)).eval()
    b.load_state_dict(a.state_dict())
    assert {m.eps for m in a.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert {m.eps for m in b.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    for m in b.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-6  # the same function but for the pixel range
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # b's encoder sees x in [0, 1]: as a's encoder seeing (x + 1) / 2
        assert torch.equal(b.quantize_images(x).indices, a.quantize_images((x + 1) / 2).indices)
        z = a.quantize.lookup(torch.randint(0, 64, (2, 8, 8)))
        assert torch.allclose(b.decode_latents(z), a.decode_latents(z) * 2 - 1, atol=1e-6)
        xrec, q = b(x)  # the training pass takes and gives [-1, 1] images too
        assert torch.allclose(xrec, b.decode_latents(q.z_q))
    with pytest.raises(ModelFolderError, match="pixel_range must be one of '-1,1', '0,1', got '0-1'"):
        preset("tiny", pixel_range="0-1")


def test_settings_no_shape_shows_must_match_the_weights():
    made = preset("tiny", pixel_range="0,1")
    preset("tiny", pixel_range="0,1").check_same_function(made, "init_from x")
    with pytest.raises(ModelFolderError, match=r"init_from x: the weights were made with pixel_range '0,1', this "
                                               r"model has '-1,1'; set model.pixel_range: 0,1"):
        preset("tiny").check_same_function(made, "init_from x")
    with pytest.raises(ModelFolderError, match="norm_eps 1e-05"):
        preset("tiny", pixel_range="0,1").check_same_function(preset("tiny", pixel_range="0,1", norm_eps=1e-5), "x")

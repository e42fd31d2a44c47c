"""python -m vqgan.convert against the reference implementations: min-dalle 0.4.11's VQGanDetokenizer, a vqgan-jax
Flax tree written from the same tensors, and taming-transformers' own Encoder / Decoder; bad inputs."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

from tests._vqgan_helpers import one_thread  # noqa: F401  (autouse fixture)
from core.flax_msgpack import unflatten, write_flax_msgpack
from vqgan import VQGAN, preset
from vqgan.convert import main as convert_main
from vqgan.convert_taming import main as convert_taming_main

F16 = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "resolution": 256,
       "z_channels": 256, "in_channels": 3, "out_ch": 3, "dropout": 0.0}
# vqgan-jax's config.json keys (configuration_vqgan.py) as dalle-mini's VQGAN folder states them
JAX_CONFIG = {**F16, "n_embed": 16384, "embed_dim": 256, "double_z": False, "resamp_with_conv": True,
              "give_pre_end": False, "architectures": ["VQModel"], "transformers_version": "4.19.2"}
# Decoded pixels on the [0, 1] scale. The tensors convert exactly, and in min-dalle's NCHW memory layout the outputs
# agree to float rounding (the 1e-5); in the NHWC layout from_pretrained loads, the convolutions round
# differently, and min-dalle's own output moves by 4.3e-5 when given that layout.
TOL_SAME_LAYOUT, TOL = 1e-5, 1e-4


def _min_dalle_detokenizer_class():
    # loaded by path: importing the min_dalle package runs min_dalle/min_dalle.py, which turns autograd off and sets
    # the thread count for the whole process
    root = importlib.util.find_spec("min_dalle").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_min_dalle_vqgan", os.path.join(root, "models",
                                                                                   "vqgan_detokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VQGanDetokenizer


def _taming_modules():
    from taming.modules.diffusionmodules import model  # only torch and numpy; taming.models would need Lightning 1.x

    return model


def _perturb_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """GroupNorms start at scale 1, bias 0: random values make a swapped scale/bias or a lost norm show."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _vqgan_jax_tree(state: dict[str, torch.Tensor]) -> dict:
    """A taming-named state dict as vqgan-jax's converter (convert_pt_model_to_jax.py) lays it out."""
    flat = {}
    for key, value in state.items():
        for pat in re.findall(r"\w+[.]\d+", key):  # down.0 -> down_0, as its rename_key
            key = key.replace(pat, "_".join(pat.split(".")))
        *path, leaf = key.split(".")
        arr = value.detach().numpy().astype(np.float32)
        if leaf == "weight" and "norm" in path[-1]:
            leaf = "scale"
        elif leaf == "weight" and path[-1] == "embedding":
            leaf = "embedding"
        elif leaf == "weight" and arr.ndim == 4:
            leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)
        flat["/".join(path + [leaf])] = np.ascontiguousarray(arr)
    return unflatten(flat)


def _ours_01(model: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """Our unclamped decode on the [0, 1] scale, (B, 3, H, W)."""
    with torch.inference_mode():
        return (model.decode_latents(model.quantize.lookup(codes)) + 1) / 2


def _raw_min_dalle(det, codes: torch.Tensor) -> torch.Tensor:
    """min-dalle's decoder before its clip to [0, 1], for code grids of any size."""
    with torch.inference_mode():
        return det.decoder(det.post_quant_conv(det.embedding(codes).permute(0, 3, 1, 2).contiguous()))


def _run(argv, capsys, main=convert_main):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """min-dalle's detokenizer with random weights, its detoker.pt, and the same tensors (plus a taming encoder) as
    a dalle-mini vqgan-jax folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("published")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    det = _min_dalle_detokenizer_class()().eval()
    _perturb_norms(det, gen)
    torch.save(det.state_dict(), root / "detoker.pt")
    encoder = _taming_modules().Encoder(**F16, double_z=False)
    _perturb_norms(encoder, gen)
    quant_conv = torch.nn.Conv2d(256, 256, 1)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()})
    state.update({("quantize.embedding.weight" if k == "embedding.weight" else k): v
                  for k, v in det.state_dict().items()})
    (root / "jax").mkdir()
    write_flax_msgpack(_vqgan_jax_tree(state), str(root / "jax" / "flax_model.msgpack"))
    (root / "jax" / "config.json").write_text(json.dumps(JAX_CONFIG))
    codes = torch.randint(0, 16384, (2, 16, 16), generator=gen)
    yield dict(root=root, det=det, encoder=encoder, quant_conv=quant_conv, codes=codes)
    torch.set_num_threads(threads)


def test_min_dalle_detoker_decodes_as_min_dalle_and_exports_back(published, tmp_path, capsys):
    det, codes = published["det"], published["codes"]
    rc, out, _ = _run(["--from", "min-dalle", published["root"] / "detoker.pt", "--out", tmp_path / "m"], capsys)
    assert rc == 0 and "decoder only" in out
    model = VQGAN.from_pretrained(str(tmp_path / "m"))
    c = model.config
    assert (c.encoder, c.norm_eps, c.pixel_range, c.num_codes, c.ch_mult, c.attn_resolutions, c.resolution) == \
        (False, 1e-5, "0,1", 16384, [1, 1, 2, 2, 4], [16], 256)
    # min-dalle's own forward: (256 codes) -> (256, 256, 3) clipped to [0, 1] and scaled to 0..255
    with torch.inference_mode():
        ref = det(False, codes[:1].reshape(1, 256)) / 255
    ours = (model.decode(codes[:1])[0].permute(1, 2, 0) + 1) / 2
    err = float((ours - ref).abs().max())
    # unclipped decoder outputs in min-dalle's layout, on smaller grids (its forward takes 16x16 only)
    small = codes[:, :4, :4]
    model.to(memory_format=torch.contiguous_format)
    raw_err = float((_ours_01(model, small) - _raw_min_dalle(det, small)).abs().max())
    assert err < TOL and raw_err < TOL_SAME_LAYOUT, (err, raw_err)
    ours = {("embedding.weight" if k == "quantize.embedding.weight" else k): v for k, v in model.state_dict().items()}
    assert ours.keys() == det.state_dict().keys() and all(torch.equal(v, ours[k]) for k, v in det.state_dict().items())

    rc, out, _ = _run(["--from", "folder", tmp_path / "m", "--to", "min-dalle", tmp_path / "export"], capsys)
    assert rc == 0 and out == f"wrote {tmp_path / 'export' / 'detoker.pt'}"
    back = _min_dalle_detokenizer_class()()
    back.load_state_dict(torch.load(tmp_path / "export" / "detoker.pt", weights_only=True))  # strict
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in det.state_dict().items())


def test_dalle_mini_vqgan_jax_folder_matches_the_same_tensors(published, tmp_path, capsys):
    det, codes = published["det"], published["codes"]
    rc, out, _ = _run(["--from", "dalle-mini", published["root"] / "jax", "--out", tmp_path / "d"], capsys)
    assert rc == 0 and "encoder and decoder" in out
    model = VQGAN.from_pretrained(str(tmp_path / "d"))
    assert (model.config.encoder, model.config.norm_eps, model.config.pixel_range) == (True, 1e-6, "0,1")
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in det.state_dict().items() if k != "embedding.weight")
    assert all(torch.equal(ours[f"encoder.{k}"], v) for k, v in published["encoder"].state_dict().items())
    # vqgan-jax normalises with eps 1e-6: min-dalle's decoder with that eps is the reference
    for m in det.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-6
    try:
        small = codes[:, :8, :8]
        err = float((_ours_01(model.to(memory_format=torch.contiguous_format), small) -
                     _raw_min_dalle(det, small)).abs().max())
    finally:
        for m in det.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.eps = 1e-5
    assert err < TOL_SAME_LAYOUT, err
    # the encoder sees [0, 1] pixels, as in dalle-mini
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        z = published["quant_conv"](published["encoder"]((x + 1) / 2)).permute(0, 2, 3, 1).reshape(-1, 256)
        book = det.embedding.weight
        expected = (z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * z @ book.t()).argmin(1)
    assert torch.equal(model.encode(x).flatten(), expected)
    # exported to min-dalle (which keeps eps 1e-5), it loads strictly; the difference is said
    rc, out, _ = _run(["--from", "folder", tmp_path / "d", "--to", "min-dalle", tmp_path / "x.pt"], capsys)
    assert rc == 0 and "eps 1e-5" in out
    _min_dalle_detokenizer_class()().load_state_dict(torch.load(tmp_path / "x.pt", weights_only=True))


def test_a_model_of_this_project_exports_to_min_dalle(tmp_path, capsys):
    # trained here: [-1, 1] pixels, a low-dimensional L2-normalised codebook behind a projection
    torch.manual_seed(0)
    model = VQGAN(preset("f16-16384", encoder=False, norm_eps=1e-5, codebook_dim=8, l2_norm_codes=True)).eval()
    _perturb_norms(model, torch.Generator().manual_seed(0))
    model.save_pretrained(str(tmp_path / "m"))
    assert _run(["--from", "folder", tmp_path / "m", "--to", "min-dalle", tmp_path / "out"], capsys)[0] == 0
    det = _min_dalle_detokenizer_class()()
    det.load_state_dict(torch.load(tmp_path / "out" / "detoker.pt", weights_only=True))
    codes = torch.randint(0, 16384, (1, 4, 4))
    err = float((_ours_01(model, codes) - _raw_min_dalle(det, codes)).abs().max())
    assert err < TOL_SAME_LAYOUT, err


TAMING_DD = {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
             "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
TAMING_YAML = f"""
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 32
    ddconfig: {json.dumps(TAMING_DD)}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {{disc_start: 0, disc_weight: 0.75}}
"""


@pytest.fixture
def taming(tmp_path):
    """taming's own modules with random weights, saved as a taming training run lays them out."""
    tm = _taming_modules()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    parts = {"encoder": tm.Encoder(**TAMING_DD), "decoder": tm.Decoder(**TAMING_DD),
             "quant_conv": torch.nn.Conv2d(32, 8, 1), "post_quant_conv": torch.nn.Conv2d(8, 32, 1),
             "quantize.embedding": torch.nn.Embedding(32, 8)}
    for m in parts.values():
        _perturb_norms(m.eval(), gen)
    state = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # dropped by the converter
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "model.yaml").write_text(TAMING_YAML)
    torch.save({"state_dict": state, "global_step": 7}, run / "checkpoints" / "last.ckpt")
    return parts, state, run


def test_taming_checkpoint_encodes_and_decodes_as_taming(taming, tmp_path, capsys):
    parts, state, run = taming
    torch.save(state, tmp_path / "bare.pth")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = torch.randint(0, 32, (2, 4, 4))
    with torch.inference_mode():
        z = parts["quant_conv"](parts["encoder"](x)).permute(0, 2, 3, 1).reshape(-1, 8)
        book = parts["quantize.embedding"].weight
        # taming's VectorQuantizer2: argmin of |z|^2 + |e|^2 - 2 z.e
        expected = (z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * z @ book.t()).argmin(1).view(2, 8, 8)
        decoded = parts["decoder"](parts["post_quant_conv"](parts["quantize.embedding"](codes).permute(0, 3, 1, 2)))
    runs = [["--from", "taming", run], ["--from", "taming", run / "checkpoints" / "last.ckpt"],
            ["--from", "taming", tmp_path / "bare.pth", "--config", run / "configs" / "model.yaml"]]
    for i, argv in enumerate(runs):
        rc, out, err = _run(argv + ["--out", tmp_path / f"o{i}"], capsys)
        assert rc == 0 and "encoder and decoder" in out, err
        model = VQGAN.from_pretrained(str(tmp_path / f"o{i}"))
        assert torch.equal(model.encode(x), expected)
        with torch.inference_mode():
            err = float((model.decode_latents(model.quantize.lookup(codes)) - decoded).abs().max())
        assert err < TOL, err
    assert (model.config.pixel_range, model.config.norm_eps, model.config.legacy_commitment) == ("-1,1", 1e-6, True)
    # the former entry point is an alias of the same code
    rc, out, _ = _run(["--checkpoint", run / "checkpoints" / "last.ckpt", "--config", run / "configs" / "model.yaml",
                       "--out", tmp_path / "alias"], capsys, convert_taming_main)
    assert rc == 0 and torch.equal(VQGAN.from_pretrained(str(tmp_path / "alias")).encode(x), expected)


# ---- bad inputs: one line naming the file and the tensor, exit status 2, nothing written


def _small_sources(root) -> None:
    """Small, valid files of each format (our modules; these tests are about errors, not parity)."""
    torch.manual_seed(0)
    cfg = dict(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=32,
               num_codes=32, embed_dim=8, codebook_dim=None, l2_norm_codes=False, restart_dead=False)
    state = VQGAN(preset("tiny", **cfg)).state_dict()
    (root / "jax").mkdir()
    write_flax_msgpack(_vqgan_jax_tree(state), str(root / "jax" / "flax_model.msgpack"))
    jax_cfg = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "resolution": 32,
               "z_channels": 32, "n_embed": 32, "embed_dim": 8}
    (root / "jax" / "config.json").write_text(json.dumps(jax_cfg))
    md = {("embedding.weight" if k == "quantize.embedding.weight" else k): v for k, v in state.items()
          if not k.startswith(("encoder.", "quant_conv."))}
    torch.save(md, root / "detoker.pt")


def _damage(root, case: str) -> tuple[str, str, str]:
    """(format, SRC, what the one-line error must contain) after damaging a copy of the small sources."""
    jax, msgpack_file = root / "jax", root / "jax" / "flax_model.msgpack"
    if case == "not a checkpoint folder":
        (root / "empty").mkdir()
        return "dalle-mini", root / "empty", "no config.json"
    if case == "no detoker.pt in the folder":
        (root / "empty").mkdir()
        return "min-dalle", root / "empty", "no detoker.pt"
    if case == "no taming checkpoint":
        (root / "empty").mkdir()
        return "taming", root / "empty", "no single taming checkpoint"
    if case in ("truncated msgpack", "truncated pt"):
        path = msgpack_file if case == "truncated msgpack" else root / "detoker.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ("dalle-mini", jax, "flax_model.msgpack: not a readable Flax msgpack file") if case == \
            "truncated msgpack" else ("min-dalle", path, "detoker.pt: cannot read checkpoint")
    if case.startswith("pt "):
        state = torch.load(root / "detoker.pt", weights_only=True)
        key = "decoder.up.1.block.0.norm2.weight"
        if case == "pt missing":
            del state[key]
            expect = f"missing tensor '{key}'"
        elif case == "pt extra":
            state["decoder.extra.weight"] = torch.zeros(2)
            expect = "unexpected tensor 'decoder.extra.weight'"
        else:
            state[key] = torch.zeros(7)
            expect = f"tensor '{key}' has shape (7,)"
        torch.save(state, root / "detoker.pt")
        return "min-dalle", root / "detoker.pt", expect
    from core.flax_msgpack import flatten, read_flax_msgpack

    flat = dict(flatten(read_flax_msgpack(str(msgpack_file))))
    cfg = json.loads((jax / "config.json").read_text())
    key = "encoder/down_1/block_0/nin_shortcut/kernel"
    if case == "msgpack missing":
        del flat[key]
        expect = f"missing tensor '{key}'"
    elif case == "msgpack extra":
        flat["decoder/up_0/block_0/temb_proj/kernel"] = np.zeros((4, 4), np.float32)
        expect = "unexpected tensor 'decoder/up_0/block_0/temb_proj/kernel'"
    elif case == "msgpack misshaped":
        flat[key] = np.zeros((1, 1, 64, 32), np.float32)  # OIHW-looking: the HWIO transpose was forgotten
        expect = f"tensor '{key}' has shape (1, 1, 64, 32)"
    elif case == "config contradicts tensors":
        cfg["n_embed"] = 64
        expect = "config.json): tensor 'quantize/embedding/embedding' has shape (32, 8), the model expects (64, 8)"
    else:  # config value of the wrong type
        cfg["ch_mult"] = "1,2"
        expect = "config.json: ch_mult = '1,2' is not a valid size"
    write_flax_msgpack(unflatten(flat), str(msgpack_file))
    (jax / "config.json").write_text(json.dumps(cfg))
    return "dalle-mini", jax, expect


BAD = ["not a checkpoint folder", "no detoker.pt in the folder", "no taming checkpoint", "truncated msgpack",
       "truncated pt", "pt missing", "pt extra", "pt misshaped", "msgpack missing", "msgpack extra",
       "msgpack misshaped", "config contradicts tensors", "config value"]


def test_small_sources_convert(tmp_path, capsys):
    _small_sources(tmp_path)
    for fmt, src in (("dalle-mini", tmp_path / "jax"), ("min-dalle", tmp_path)):
        assert _run(["--from", fmt, src, "--out", tmp_path / fmt], capsys)[0] == 0


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    _small_sources(tmp_path)
    fmt, src, expect = _damage(tmp_path, case)
    out = tmp_path / "out"
    rc, _, err = _run(["--from", fmt, src, "--out", out], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_taming_mismatch_names_the_tensor(taming, tmp_path, capsys):
    _, state, run = taming
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    torch.save({"state_dict": state}, run / "checkpoints" / "last.ckpt")
    rc, _, err = _run(["--from", "taming", run, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "decoder.conv_out.weight" in err and "model.yaml" in err
    assert not (tmp_path / "o").exists()


def test_export_refuses_another_size(tmp_path, capsys):
    VQGAN(preset("tiny")).save_pretrained(str(tmp_path / "m"))
    rc, _, err = _run(["--from", "folder", tmp_path / "m", "--to", "min-dalle", tmp_path / "out"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "f16-16384" in err
    assert not (tmp_path / "out").exists()

"""Import the published VQGAN weights (taming, dalle-mini, min-dalle) as ``save_pretrained`` folders; export to
min-dalle.

    python -m vqgan.convert --from taming SRC [--config YAML] --out DIR
    python -m vqgan.convert --from dalle-mini SRC --out DIR
    python -m vqgan.convert --from min-dalle SRC --out DIR
    python -m vqgan.convert --from folder DIR --to min-dalle OUT

(the same form as ``python -m bart_prior.convert``). ``--from KIND SRC --out DIR`` writes DIR (config.json +
model.safetensors) once every tensor of SRC has been checked:

- taming: a VQModel ``.ckpt`` (weights under ``state_dict``), a bare state dict or ``.safetensors``, with the YAML
  it was trained with: ``--config``, else ``NAME.yaml`` beside it, the one ``.yaml`` in its folder, or taming's log
  layout (``checkpoints/last.ckpt`` + ``configs/*.yaml``). SRC may be the folder. ``loss.*`` (LPIPS, discriminator)
  is dropped. Pixels in [-1, 1], GroupNorm eps 1e-6.
- dalle-mini: a vqgan-jax folder (``config.json`` + ``flax_model.msgpack``, e.g. dalle-mini's
  ``vqgan_imagenet_f16_16384``), read without JAX. Sizes from config.json, those it lacks from the tensors. Pixels
  in [0, 1], eps 1e-6.
- min-dalle: ``detoker.pt`` or its folder. It holds the decoder and codebook only: the result decodes codes but
  cannot encode images. Sizes from the tensors (the image size assumes dalle-mini's 16x16 token grid). Pixels in
  [0, 1], eps 1e-5 as in min-dalle.

``--from folder DIR --to min-dalle OUT`` writes ``OUT/detoker.pt`` (OUT itself when it ends in ``.pt``), a state dict that
min-dalle 0.4.11's ``VQGanDetokenizer`` loads strictly. That class has one fixed size, taming's f16-16384 decoder.
A [-1, 1] model's output convolution is rescaled to min-dalle's [0, 1]; a projected or L2-normalised codebook is
written as the table of codes the decoder sees. min-dalle always normalises with eps 1e-5: a model made with 1e-6
(dalle-mini's) decodes slightly differently there, as min-dalle's own detoker.pt does.

Any problem is one line naming the file and the tensor or key at fault, exit status 2, and nothing is written.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from core.errors import ModelFolderError
from core.files import atomic_file, check_state, load_safetensors, load_state, read_json, require_files
from core.flax_msgpack import flatten, read_flax_msgpack
from vqgan.model import VQGAN, VQGANConfig

FORMATS = ("taming", "dalle-mini", "min-dalle")
JAX_CONFIG, JAX_WEIGHTS, DETOKER = "config.json", "flax_model.msgpack", "detoker.pt"
# the weights do not fix the image size; dalle-mini's prior draws 16x16 = 256 codes
DEFAULT_GRID = 16
# min-dalle's VQGanDetokenizer hard-codes taming's f16-16384 decoder
MIN_DALLE_SIZES = dict(resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                       z_channels=256, num_codes=16384, embed_dim=256, out_channels=3)
# vqgan-jax config.json keys -> ours (configuration_vqgan.py); its other architecture flags must keep the values
# vqgan-jax's defaults and dalle-mini's VQGAN have
JAX_KEYS = {"ch": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks",
            "attn_resolutions": "attn_resolutions", "resolution": "resolution", "z_channels": "z_channels",
            "in_channels": "in_channels", "out_ch": "out_channels", "n_embed": "num_codes", "embed_dim": "embed_dim",
            "dropout": "dropout"}
# taming's ddconfig flags too: double_z is a KL autoencoder, no resampling convs or give_pre_end another network
FIXED_FLAGS = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False}


def imported_config(**sizes: Any) -> VQGANConfig:
    """The config of published weights: taming's plain codebook with its beta placement, no codebook restarts."""
    return VQGANConfig(**{"codebook_dim": None, "l2_norm_codes": False, "ema": False, "restart_dead": False,
                          "legacy_commitment": True, "norm_groups": 32, "mid_attention": True, **sizes})


# ---- names and layouts of each format (ours: the taming names of VQGAN.state_dict())


def _flax_path(key: str) -> str:
    """Our key -> vqgan-jax's path: its submodule lists are named ``down_0``, ``block_1``...; kernels, scales."""
    *modules, leaf = key.split(".")
    if leaf == "weight":
        kind = modules[-1]
        leaf = "scale" if kind.startswith("norm") else "embedding" if kind == "embedding" else "kernel"
    return "/".join(re.sub(r"\.(\d+)", r"_\1", ".".join(modules)).split(".") + [leaf])


def _flax_key(path: str) -> str:
    parts = path.split("/")
    out = [f"{m[1]}.{m[2]}" if (m := re.fullmatch(r"(down|up|block|attn)_(\d+)", p)) and parts[i - 1:i] != ["mid"]
           else p for i, p in enumerate(parts[:-1])]  # mid's block_1 / attn_1 are names, not list indices
    return ".".join(out + ["weight" if parts[-1] in ("kernel", "scale", "embedding") else parts[-1]])


class Naming:
    """A checkpoint format's tensor names and layout, both ways."""

    def __init__(self, theirs: Callable[[str], str] = lambda k: k, ours: Callable[[str], str] = lambda k: k,
                 hwio: bool = False):
        self.theirs, self.ours, self.hwio = theirs, ours, hwio

    def their_shape(self, shape: tuple) -> tuple:
        return (shape[2], shape[3], shape[1], shape[0]) if self.hwio and len(shape) == 4 else shape

    def our_shape(self, shape: tuple) -> tuple:
        return (shape[3], shape[2], shape[0], shape[1]) if self.hwio and len(shape) == 4 else shape

    def to_torch(self, value: Any) -> torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        t = t.float()
        return t.permute(3, 2, 0, 1).contiguous() if self.hwio and t.dim() == 4 else t.contiguous()


TAMING = Naming()
MIN_DALLE = Naming(theirs=lambda k: "embedding.weight" if k == "quantize.embedding.weight" else k,
                   ours=lambda k: "quantize.embedding.weight" if k == "embedding.weight" else k)
VQGAN_JAX = Naming(theirs=_flax_path, ours=_flax_key, hwio=True)


class _Expected:
    """Expected names and shapes, in the form ``core.files.check_state`` takes a model (no memory allocated)."""

    def __init__(self, shapes: Mapping[str, tuple]):
        self.shapes = shapes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}


def _checked_load(cfg: VQGANConfig, found: Mapping[str, Any], naming: Naming, source: str) -> VQGAN:
    """Build ``cfg`` and load ``found`` (the file's names and layout) into it; any difference is a one-line error
    in the file's names."""
    for name, value in found.items():
        if not hasattr(value, "shape"):
            raise ModelFolderError(f"{source}: '{name}' is a {type(value).__name__}, not a tensor")
    model = VQGAN(cfg)
    own = model.state_dict()
    names = {k: naming.theirs(k) for k in own}
    check_state(_Expected({names[k]: naming.their_shape(tuple(v.shape)) for k, v in own.items()}), found, source)
    load_state(model, {k: naming.to_torch(found[names[k]]) for k in own}, source)
    return model


def sizes_from_tensors(found: Mapping[str, Any], naming: Naming, source: str, encoder: bool,
                       resolution: Optional[int] = None) -> dict[str, Any]:
    """VQGANConfig sizes read off the tensor shapes (``found`` in the file's names and layout); ``resolution``, which
    no tensor shows, defaults to dalle-mini's 16x16 token grid."""
    shapes = {naming.ours(k): naming.our_shape(tuple(v.shape)) for k, v in found.items() if hasattr(v, "shape")}

    def need(key: str, ndim: int) -> tuple:
        if key not in shapes:
            raise ModelFolderError(f"{source}: missing tensor '{naming.theirs(key)}'")
        if len(shapes[key]) != ndim:
            raise ModelFolderError(f"{source}: tensor '{naming.theirs(key)}' has {len(shapes[key])} dimensions, "
                                   f"expected {ndim}")
        return shapes[key]

    levels = 1 + max((int(m[1]) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=0)
    widths = [need(f"decoder.up.{i}.block.0.conv1.weight", 4)[0] for i in range(levels)]
    ch = need("encoder.conv_in.weight", 4)[0] if encoder else math.gcd(*widths)
    for i, w in enumerate(widths):
        if ch < 1 or w % ch:
            raise ModelFolderError(f"{source}: tensor '{naming.theirs(f'decoder.up.{i}.block.0.conv1.weight')}' has "
                                   f"{w} channels, not a multiple of the base width {ch}")
    blocks = sum(1 for k in shapes if re.fullmatch(r"decoder\.up\.0\.block\.\d+\.conv1\.weight", k))
    resolution = resolution or DEFAULT_GRID * 2 ** (levels - 1)
    num_codes, embed_dim = need("quantize.embedding.weight", 2)
    attention = [i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in shapes]
    return dict(resolution=resolution, ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=blocks - 1,
                attn_resolutions=[resolution >> i for i in attention],
                mid_attention="decoder.mid.attn_1.q.weight" in shapes, z_channels=need("decoder.conv_in.weight", 4)[1],
                in_channels=need("encoder.conv_in.weight", 4)[1] if encoder else 3,
                out_channels=need("decoder.conv_out.weight", 4)[0], num_codes=num_codes, embed_dim=embed_dim,
                encoder=encoder)


# ---- readers


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a torch file (a Lightning checkpoint's ``state_dict`` too) or ``.safetensors``."""
    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: not found")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # zip, pickle and unpickler errors alike: the file is damaged or not a torch file
        pickled = not trust_pickle and "Weights only load failed" in str(exc)
        hint = " (it stores other Python objects: if you trust it, add --trust-pickle)" if pickled else ""
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelFolderError(f"{path}: cannot read checkpoint: {detail}{hint}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFolderError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint with "
                               "'state_dict')")
    return state


def config_from_taming(yaml_path: str) -> VQGANConfig:
    """taming YAML (``model.params`` with ``ddconfig``, ``n_embed``, ``embed_dim``) -> VQGANConfig."""
    from omegaconf import OmegaConf

    if not os.path.isfile(yaml_path):
        raise ModelFolderError(f"{yaml_path}: taming config not found")
    try:
        raw: Any = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)
    except Exception as exc:
        raise ModelFolderError(f"{yaml_path}: not a readable YAML file ({str(exc).splitlines()[0][:200]})") from None
    model = raw.get("model", raw) if isinstance(raw, dict) else None
    params = model.get("params", model) if isinstance(model, dict) else None
    dd = params.get("ddconfig") if isinstance(params, dict) else None
    if not isinstance(dd, dict):
        raise ModelFolderError(f"{yaml_path}: no model.params.ddconfig section (is this a taming VQModel config?)")
    _check_flags(dd, f"{yaml_path}: ddconfig.")
    for key in ("remap", "sane_index_shape"):
        if params.get(key):
            raise ModelFolderError(f"{yaml_path}: model.params.{key} is not supported")
    try:
        return imported_config(
            resolution=int(dd["resolution"]), in_channels=int(dd.get("in_channels", 3)),
            out_channels=int(dd.get("out_ch", 3)), ch=int(dd["ch"]), ch_mult=[int(m) for m in dd["ch_mult"]],
            num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=[int(r) for r in dd.get("attn_resolutions", [])],
            z_channels=int(dd["z_channels"]), dropout=float(dd.get("dropout", 0.0)), num_codes=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]), beta=float(params.get("beta", 0.25)),
            legacy_commitment=bool(params.get("legacy", True)))
    except KeyError as exc:
        raise ModelFolderError(f"{yaml_path}: missing key {exc.args[0]!r} in model.params / ddconfig") from None
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{yaml_path}: a size in model.params / ddconfig is not a number ({exc})") from None


def _one(paths: list[str], prefer: str = "") -> Optional[str]:
    named = [p for p in paths if os.path.basename(p) == prefer]
    return paths[0] if len(paths) == 1 else named[0] if named else None


def find_taming_files(src: str, config: Optional[str] = None) -> tuple[str, str]:
    """(checkpoint, YAML) from a checkpoint file or its folder, the YAML found beside it unless given."""
    ckpt = src
    if os.path.isdir(src):
        found = glob.glob(os.path.join(src, "*.ckpt")) + glob.glob(os.path.join(src, "checkpoints", "*.ckpt"))
        ckpt = _one(sorted(found), "last.ckpt") or ""
        if not ckpt:
            raise ModelFolderError(f"{src}: no single taming checkpoint (*.ckpt, checkpoints/*.ckpt) in the folder; "
                                   "pass the checkpoint file")
    if not os.path.isfile(ckpt):
        raise ModelFolderError(f"{ckpt}: not found")
    if config:
        return ckpt, config
    here = os.path.dirname(os.path.abspath(ckpt))
    stem = os.path.splitext(ckpt)[0] + ".yaml"
    found = (stem if os.path.isfile(stem) else _one(sorted(glob.glob(os.path.join(here, "*.yaml"))))
             or _one(sorted(glob.glob(os.path.join(os.path.dirname(here), "configs", "*.yaml"))), "model.yaml"))
    if not found:
        raise ModelFolderError(f"{ckpt}: cannot tell which taming YAML goes with it; pass --config")
    return ckpt, found


# ---- the three importers


def import_taming(src: str, config: Optional[str] = None, trust_pickle: bool = False) -> VQGAN:
    ckpt, yaml_path = find_taming_files(src, config)
    cfg = config_from_taming(yaml_path)
    state = {k: v for k, v in read_state_dict(ckpt, trust_pickle).items() if not k.startswith("loss.")}
    return _checked_load(cfg, state, TAMING, f"{ckpt} (sizes from {yaml_path})")


def _check_flags(raw: dict, where: str) -> None:
    for key, value in FIXED_FLAGS.items():
        if key in raw and raw[key] != value:
            raise ModelFolderError(f"{where}{key} = {raw[key]!r} is not supported (a VQGAN of this design has {value})")


def _jax_sizes(raw: dict, cfg_path: str) -> dict[str, Any]:
    _check_flags(raw, f"{cfg_path}: ")
    sizes: dict[str, Any] = {}
    for key, ours in JAX_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        try:
            if ours in ("ch_mult", "attn_resolutions"):
                if not isinstance(value, list):
                    raise TypeError
                sizes[ours] = [int(v) for v in value]
            else:
                sizes[ours] = float(value) if ours == "dropout" else int(value)
        except (TypeError, ValueError):
            raise ModelFolderError(f"{cfg_path}: {key} = {value!r} is not a valid size") from None
    return sizes


def import_dalle_mini(src: str) -> VQGAN:
    folder = os.path.dirname(src) if os.path.isfile(src) else src
    require_files(folder, (JAX_CONFIG, JAX_WEIGHTS), "vqgan-jax (dalle-mini VQGAN)",
                  "pass the folder holding dalle-mini's VQGAN config.json and flax_model.msgpack")
    cfg_path, weights = os.path.join(folder, JAX_CONFIG), os.path.join(folder, JAX_WEIGHTS)
    stated = _jax_sizes(read_json(cfg_path), cfg_path)
    tree = read_flax_msgpack(weights)
    if set(tree) == {"params"}:  # a Flax variables dict rather than transformers' bare params
        tree = tree["params"]
    found = dict(flatten(tree))
    sizes = {**sizes_from_tensors(found, VQGAN_JAX, weights, True, stated.get("resolution")), **stated}
    cfg = imported_config(**sizes, pixel_range="0,1", norm_eps=1e-6)
    return _checked_load(cfg, found, VQGAN_JAX, f"{weights} (sizes from {cfg_path})")


def import_min_dalle(src: str) -> VQGAN:
    path = os.path.join(src, DETOKER) if os.path.isdir(src) else src
    if os.path.isdir(src) and not os.path.isfile(path):
        raise ModelFolderError(f"{src} is not a min-dalle VQGAN folder (no {DETOKER}); pass min-dalle's detoker.pt")
    found = read_state_dict(path)
    cfg = imported_config(**sizes_from_tensors(found, MIN_DALLE, path, encoder=False), pixel_range="0,1",
                          norm_eps=1e-5)
    return _checked_load(cfg, found, MIN_DALLE, path)


def import_checkpoint(fmt: str, src: str, out: str, config: Optional[str] = None, trust_pickle: bool = False) -> VQGAN:
    """Convert ``src`` (in format ``fmt``) into the ``save_pretrained`` folder ``out``; returns the model."""
    if fmt not in FORMATS:
        raise ModelFolderError(f"unknown checkpoint format {fmt!r}; one of {', '.join(FORMATS)}")
    if not os.path.exists(src):
        raise ModelFolderError(f"{src}: not found")
    if fmt == "taming":
        model = import_taming(src, config, trust_pickle)
    elif fmt == "dalle-mini":
        model = import_dalle_mini(src)
    else:
        model = import_min_dalle(src)
    model.save_pretrained(out)
    return model


# ---- export


@torch.no_grad()
def min_dalle_state(model: VQGAN, source: str) -> dict[str, torch.Tensor]:
    """The state dict min-dalle's VQGanDetokenizer loads, from ``model``; a model of another size is refused."""
    c = model.config
    codes = torch.arange(c.num_codes).view(1, -1, 1)
    # the codes as the decoder sees them: any projection or normalisation of the codebook applied once, here
    state = {"embedding.weight": model.quantize.lookup(codes)[0, :, :, 0].t()}
    for key, value in model.state_dict().items():
        if key.startswith(("decoder.", "post_quant_conv.")):
            state[key] = value
    if c.pixel_range == "-1,1":  # min-dalle clips the decoder output to [0, 1]: move (x + 1) / 2 into conv_out
        state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] / 2
        state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] / 2 + 0.5
    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}
    with torch.device("meta"):
        target = VQGAN(imported_config(**MIN_DALLE_SIZES, encoder=False)).state_dict()
    expected = {MIN_DALLE.theirs(k): tuple(v.shape) for k, v in target.items()}
    fixed = f"{source} (min-dalle's VQGanDetokenizer is taming's f16-16384 decoder)"
    check_state(_Expected(expected), state, fixed)
    if c.norm_groups != 32:  # not visible in the shapes
        raise ModelFolderError(f"{fixed}: it normalises in 32 groups, this model in {c.norm_groups}")
    return state


def export_min_dalle(model_dir: str, out: str) -> tuple[str, VQGANConfig]:
    """Write ``model_dir``'s decoder as min-dalle's detoker.pt (``out`` or ``out/detoker.pt``); returns its path
    and the exported model's config."""
    model = VQGAN.from_pretrained(model_dir)
    state = min_dalle_state(model, model_dir)
    path = out if out.endswith(".pt") else os.path.join(out, DETOKER)
    with atomic_file(path, "wb") as fh:
        torch.save(state, fh)
    return path, model.config


def main(argv: Optional[Sequence[str]] = None) -> int:
    title, _, details = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(prog="python -m vqgan.convert", description=" ".join(title.split()), epilog=details,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", nargs=2, metavar=("KIND", "SRC"), required=True,
                    help=f"where the VQGAN is: {', '.join(FORMATS)} or folder (a save_pretrained folder)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="the save_pretrained folder to write")
    out.add_argument("--to", nargs=2, metavar=("KIND", "OUT"), help="export: min-dalle OUT (a folder or a .pt file)")
    ap.add_argument("--config", help="taming: the YAML the checkpoint was trained with (default: found beside it)")
    ap.add_argument("--trust-pickle", action="store_true", help="taming: allow other pickled objects in the .ckpt")
    args = ap.parse_args(argv)
    kind, src = args.source
    if kind not in (*FORMATS, "folder"):
        ap.error(f"--from {kind}: choose one of {', '.join(FORMATS)}, folder")
    if (kind == "folder") != bool(args.to) or (args.to and args.to[0] != "min-dalle"):
        ap.error("use --from taming|dalle-mini|min-dalle SRC --out DIR, or --from folder DIR --to min-dalle OUT")
    if args.to:  # run_conversion's export form: the folder to export and where to write
        return run_conversion(argparse.Namespace(to="min-dalle", model=src, path=args.to[1]))
    return run_conversion(argparse.Namespace(to=None, fmt=kind, path=src, out=args.out, config=args.config,
                                             trust_pickle=args.trust_pickle))


def run_conversion(args: argparse.Namespace) -> int:
    """Run a parsed command line; one-line errors, exit status 2 (shared with ``vqgan.convert_taming``)."""
    try:
        if args.to:
            path, exported = export_min_dalle(args.model, args.path)
            note = "" if exported.norm_eps == 1e-5 else (f" (min-dalle normalises with eps 1e-5, this model with "
                                                         f"{exported.norm_eps:g}: its decodes differ slightly)")
            print(f"wrote {path}{note}")
            return 0
        model = import_checkpoint(args.fmt, args.path, args.out, args.config, args.trust_pickle)
    except (ModelFolderError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = model.config
    kind = "decoder only: decodes, cannot encode" if not c.encoder else "encoder and decoder"
    print(f"wrote {args.out}: {c.num_codes} codes, {c.token_grid}x{c.token_grid} tokens at {c.resolution} px, {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

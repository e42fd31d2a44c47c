"""Convert a taming-transformers VQModel checkpoint + YAML into a ``save_pretrained`` folder.

    python -m vqgan.convert_taming --checkpoint last.ckpt --config model.yaml --out DIR

The checkpoint may be a Lightning ``.ckpt`` (weights under ``state_dict``), a bare state dict, or ``.safetensors``.
``loss.*`` (LPIPS, discriminator) is dropped; everything else must match the architecture exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from core.files import load_state
from vqgan.model import VQGAN, CheckpointError, VQGANConfig


def config_from_taming(yaml_path: str) -> VQGANConfig:
    """taming YAML (``model.params`` with ``ddconfig``, ``n_embed``, ``embed_dim``) -> VQGANConfig."""
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"taming config {yaml_path} not found")
    raw: Any = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)
    params = raw.get("model", raw).get("params", raw.get("model", raw))
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise CheckpointError(f"{yaml_path}: no model.params.ddconfig section (is this a taming VQModel config?)")
    dd = params["ddconfig"]
    if dd.get("double_z", False):
        raise CheckpointError(f"{yaml_path}: ddconfig.double_z is true; that is a KL autoencoder, not a VQGAN")
    for key in ("remap", "sane_index_shape"):
        if params.get(key):
            raise CheckpointError(f"{yaml_path}: model.params.{key} is not supported")
    try:
        return VQGANConfig(
            resolution=int(dd["resolution"]), in_channels=int(dd.get("in_channels", 3)),
            out_channels=int(dd.get("out_ch", 3)), ch=int(dd["ch"]), ch_mult=[int(m) for m in dd["ch_mult"]],
            num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=[int(r) for r in dd.get("attn_resolutions", [])],
            mid_attention=True, z_channels=int(dd["z_channels"]), dropout=float(dd.get("dropout", 0.0)),
            norm_groups=32, num_codes=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), codebook_dim=None,
            beta=float(params.get("beta", 0.25)), legacy_commitment=bool(params.get("legacy", True)),
            l2_norm_codes=False, ema=False, restart_dead=False)
    except KeyError as exc:
        raise CheckpointError(f"{yaml_path}: missing key {exc.args[0]!r} in model.params / ddconfig") from None


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        hint = "" if trust_pickle else " (if it stores other Python objects and you trust it, add --trust-pickle)"
        raise CheckpointError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0][:200]}{hint}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint with 'state_dict')")
    return state


def convert(checkpoint: str, config: str, out_dir: str, trust_pickle: bool = False) -> VQGAN:
    cfg = config_from_taming(config)
    state = {k: v for k, v in read_state_dict(checkpoint, trust_pickle).items() if not k.startswith("loss.")}
    model = VQGAN(cfg)
    load_state(model, state, source=checkpoint)
    model.save_pretrained(out_dir)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vqgan.convert_taming", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="taming .ckpt, bare state dict (.pt/.pth) or .safetensors")
    ap.add_argument("--config", required=True, help="the taming YAML the checkpoint was trained with")
    ap.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects in the checkpoint")
    args = ap.parse_args(argv)
    try:
        model = convert(args.checkpoint, args.config, args.out, args.trust_pickle)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = model.config
    print(f"wrote {args.out}: {c.num_codes} codes, {c.token_grid}x{c.token_grid} tokens at {c.resolution} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())

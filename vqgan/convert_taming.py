"""The former taming converter, kept as an alias of ``python -m vqgan.convert --from taming``.

    python -m vqgan.convert_taming --checkpoint last.ckpt --config model.yaml --out DIR
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vqgan.convert import config_from_taming, import_checkpoint, read_state_dict, run_conversion
from vqgan.model import VQGAN

__all__ = ["config_from_taming", "convert", "main", "read_state_dict"]


def convert(checkpoint: str, config: str, out_dir: str, trust_pickle: bool = False) -> VQGAN:
    return import_checkpoint("taming", checkpoint, out_dir, config, trust_pickle)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vqgan.convert_taming", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="taming .ckpt, bare state dict (.pt/.pth) or .safetensors")
    ap.add_argument("--config", required=True, help="the taming YAML the checkpoint was trained with")
    ap.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects in the checkpoint")
    args = ap.parse_args(argv)
    return run_conversion(argparse.Namespace(fmt="taming", path=args.checkpoint, out=args.out, config=args.config,
                                             trust_pickle=args.trust_pickle, to=None, model=None))


if __name__ == "__main__":
    sys.exit(main())

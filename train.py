#!/usr/bin/env python
"""The one training entry point.

    python train.py COMPONENT --config FILE [key=value ...]      COMPONENT: vqgan | bart_prior | clip

Everything is in launch/; this file only parses the command line.
"""
from __future__ import annotations

import argparse
import logging
import sys

from launch.components import REGISTRY
from launch.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("component", choices=sorted(REGISTRY))
    parser.add_argument("--config", help="YAML file (may 'extends:' others)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=100 data.batch_size=8")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from launch.train import run_training

    try:
        result = run_training(args.component, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(result.export_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The one training entry point.

    python train.py STAGE --config FILE [key=value ...]            train (resumes runs/NAME when present)
    python train.py STAGE --config FILE --slurm [--nodes N ...]    write runs/NAME/job.sbatch and submit it
    python train.py bundle --vqgan D1 --bart-prior D2 --clip-rank D3 --out DIR    assemble a generation bundle

STAGE is vqgan, bart_prior or clip_rank (``clip`` and ``prior`` are accepted too). The training plumbing is in
launch/, bundles in pipeline/; this file only parses the command line.
"""
from __future__ import annotations

import argparse
import logging
import sys

from core.errors import UserError
from launch.components import ALIASES, REGISTRY, canonical_name


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("component", choices=sorted(REGISTRY) + sorted(ALIASES), metavar="STAGE",
                   help="vqgan | bart_prior | clip_rank")
    p.add_argument("--config", help="YAML file (may 'extends:' others)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=100 data.batch_size=8")
    s = p.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="submit as a SLURM batch job instead of running here")
    s.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch script, submit nothing")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU tasks, one per trainer.devices")
    s.add_argument("--cpus-per-task", type=int, default=1)
    s.add_argument("--time", default="01:00:00")
    s.add_argument("--partition")
    s.add_argument("--account")
    return p


def _bundle_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py bundle", description="Assemble vqgan/, bart_prior/, clip_rank/ "
                                "into one folder for generate.py, checking that the parts fit.")
    p.add_argument("--vqgan", required=True, help="a VQGAN save_pretrained folder")
    p.add_argument("--bart-prior", "--prior", dest="bart_prior", required=True,
                   help="a BartPrior save_pretrained folder")
    p.add_argument("--clip-rank", "--clip", dest="clip_rank", required=True,
                   help="a CLIP: an open_clip folder, or an open_clip checkpoint file with --clip-arch")
    p.add_argument("--clip-arch", help="the open_clip architecture of a --clip-rank checkpoint file, e.g. ViT-B-32")
    p.add_argument("--condition-scale", type=float, help="store this sampling default in the bundle's prior")
    p.add_argument("--temperature", type=float, help="store this sampling default in the bundle's prior")
    p.add_argument("--out", required=True)
    return p


def one_line(exc: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker arrives wrapped with the worker's traceback,
    whose last line is the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in ("launch", "pipeline", "vqgan", "bart_prior", "clip_rank", "data"):  # our progress notes, not libraries' chatter
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        if argv[:1] == ["bundle"]:
            from pipeline.bundle import assemble_bundle

            from data.errors import blocking_file

            a = _bundle_parser().parse_args(argv[1:])
            blocking = blocking_file(a.out)
            if blocking:
                print(f"error: --out {a.out}: {blocking} is a file, not a folder", file=sys.stderr)
                return 2
            sampling = {k: v for k, v in (("condition_scale", a.condition_scale), ("temperature", a.temperature))
                        if v is not None}
            print(assemble_bundle(a.vqgan, a.bart_prior, a.clip_rank, a.out, sampling=sampling, clip_arch=a.clip_arch))
            return 0
        args = _train_parser().parse_intermixed_args(argv)
        args.component = canonical_name(args.component)
        if args.slurm:
            return _slurm(args)
        from launch.train import run_training

        result = run_training(args.component, args.config, args.overrides)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written: --out under a regular file, a full disk...
        from data.errors import os_error

        print(f"error: {os_error(exc)}", file=sys.stderr)
        return 2
    if result.export_dir is None:
        print(f"stopped for requeue; the job resumes from {result.run.root}", file=sys.stderr)
        return 0
    print(result.export_dir)
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from launch.run import prepare_run
    from launch.slurm import SlurmOptions, render_sbatch, submit
    from launch.train import resolve_config

    cfg = resolve_config(args.component, args.config, args.overrides, check_files=False)  # checked when the job starts
    run, _ = prepare_run(cfg)
    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                        time=args.time, partition=args.partition, account=args.account)
    script = render_sbatch(args.component, args.config, args.overrides, cfg, run, opts)
    if args.dry_run:
        print(script)
        return 0
    print(submit(script, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

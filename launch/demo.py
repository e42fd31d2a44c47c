"""`make demo`: the whole pipeline on the synthetic shapes set, from nothing to a ranked image grid and a report.

    python -m launch.demo [--out runs/demo] [--preset full|tiny] [--force STAGE ...] [--time-scale F]

Each stage is the command a user would type (printed before it runs) and is skipped when its output exists, so a
rerun continues where the last one stopped (a training stage resumes from its last checkpoint). The prior and CLIP
train at the same time, each on half the cores, their output in OUT/logs/.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Preset:
    samples: int  # shapes rendered (train + val)
    vqgan: list[str] = field(default_factory=list)  # overrides
    prior: list[str] = field(default_factory=list)
    clip: list[str] = field(default_factory=list)
    config: str = "shapes"  # configs/<component>/<config>.yaml
    vocab_size: int = 512
    eval_prompts: tuple[int, int] = (64, 64)  # seen, held-out (fewer made the shares swing by 10+ points)
    candidates: int = 16
    scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    temperatures: tuple[float, ...] = (1.0, 0.85)  # swept at the best scale (0.7 measured lower: 40.6% vs 41.4%)
    minutes: dict[str, float] = field(default_factory=dict)  # wall-clock cap per training stage (trainer.max_time)
    # Stages that need only earlier outputs, not each other, run at the same time with the cores split between them:
    # the prior and CLIP both wait only for the VQGAN. On 2 CPU cores the small CLIP ran 1.9 steps/s on one thread
    # and 2.3 on two, while the prior keeps about 60% of its two-thread rate on one (README, demo).
    side_by_side: tuple[str, ...] = ("bart_prior", "clip")


PRESETS = {
    # minutes: wall-clock caps, set so the whole demo takes about 30 minutes on a 2-core AVX2 CPU (session 5); each
    # run anneals by its cap or its config's max_steps, whichever ends it first; --time-scale gives slower machines more.
    "full": Preset(samples=24000, minutes={"vqgan": 10, "bart_prior": 11, "clip": 11}),
    # Seconds per stage: exercises every stage and file format (the test suite runs it), not quality.
    "tiny": Preset(samples=400, config="tiny", vocab_size=300, eval_prompts=(3, 3), candidates=4, scales=(1.0, 2.0), temperatures=(1.0, 0.7),
                   vqgan=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"],
                   prior=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"],
                   clip=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"]),
}


def _show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _run(cmd: list[str]) -> None:
    print("\n$ " + _show(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _run_side_by_side(jobs: dict[str, list[str]], log_dir: str) -> dict[str, float]:
    """Run one command per stage at the same time, the CPU cores split evenly; each writes ``log_dir/NAME.log``.
    Returns each stage's seconds; a failure shows the end of its log and raises."""
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    os.makedirs(log_dir, exist_ok=True)
    running, t0 = {}, time.time()
    for name, cmd in jobs.items():
        cmd = [*cmd, f"trainer.num_threads={threads}"]
        log = os.path.join(log_dir, f"{name}.log")
        print(f"\n$ {_show(cmd)} > {log} 2>&1", flush=True)
        with open(log, "w") as fh:
            running[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    print(f"  {' and '.join(jobs)} side by side, {threads} thread(s) each (follow with tail -f {log_dir}/*.log)",
          flush=True)
    seconds, failed = {}, []
    for name, proc in running.items():
        if proc.wait() != 0:
            failed.append(name)
        seconds[name] = round(time.time() - t0, 1)
        print(f"  [{name}] finished ({seconds[name]:.0f} s, exit {proc.returncode})", flush=True)
    for name in failed:
        with open(os.path.join(log_dir, f"{name}.log"), errors="replace") as fh:
            tail = fh.read()[-3000:]
        print(f"\n--- end of {log_dir}/{name}.log ---\n{tail}", file=sys.stderr, flush=True)
    if failed:
        raise subprocess.CalledProcessError(1, f"stage(s) {', '.join(failed)}")
    return seconds


def _exported(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, "export"))


def max_time(minutes: float) -> str:
    """Minutes -> trainer.max_time's "DD:HH:MM:SS"."""
    secs = max(1, round(minutes * 60))
    return f"{secs // 86400:02d}:{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def stages(out: str, preset: Preset, time_scale: float = 1.0) -> list[tuple[str, Callable[[], bool], list[list[str]]]]:
    """(name, done?, commands) in order; ``time_scale`` multiplies the training stages' wall-clock caps."""
    py = sys.executable
    shapes, codes, tok = f"{out}/shapes", f"{out}/codes", f"{out}/tokenizer"
    vq_export = f"{out}/vqgan/export"
    common = [f"runs_dir={out}", "resume=auto"]
    img_data = [f"data.train={shapes}/train/*.tar", f"data.val={shapes}/val/*.tar"]
    code_data = [f"data.train={codes}/train/*.tar", f"data.val={codes}/val/*.tar"]

    def train(component: str, folder: str, name: str, extra: list[str]) -> list[str]:
        cap = [f"trainer.max_time={max_time(preset.minutes[component] * time_scale)}"] \
            if component in preset.minutes else []
        return [py, "train.py", component, "--config", f"configs/{folder}/{preset.config}.yaml", f"name={name}",
                *common, *extra, *cap]

    return [
        ("shapes", lambda: os.path.exists(f"{shapes}/manifest.json"),
         [[py, "-m", "data", "prepare", "shapes", "--out", shapes, "--num-samples", str(preset.samples)]]),
        ("vqgan", lambda: _exported(f"{out}/vqgan"), [train("vqgan", "vqgan", "vqgan", img_data + preset.vqgan)]),
        ("encode", lambda: os.path.exists(f"{codes}/val/.done"),
         [[py, "-m", "vqgan.encode", "--model", vq_export, "--input", f"{shapes}/{split}/*.tar",
           "--output", f"{codes}/{split}"] for split in ("train", "val")]
         + [["touch", f"{codes}/val/.done"]]),
        ("tokenizer", lambda: os.path.exists(f"{tok}/tokenizer.json"),
         [[py, "-m", "bart_prior.tokenizer", "train", "--input", f"{shapes}/train/*.tar",
           "--vocab-size", str(preset.vocab_size), "--out", tok]]),
        ("bart_prior", lambda: _exported(f"{out}/bart_prior"),
         [train("bart_prior", "bart_prior", "bart_prior", code_data + [f"tokenizer.path={tok}", f"model.vqgan_for_samples={vq_export}"]
                 + preset.prior)]),
        ("clip", lambda: _exported(f"{out}/clip"),
         [train("clip", "clip_rank", "clip", img_data + [f"model.reconstruct_with={vq_export}"] + preset.clip)]),
        ("bundle", lambda: os.path.isdir(f"{out}/bundle"),
         [[py, "train.py", "bundle", "--vqgan", vq_export, "--prior", f"{out}/bart_prior/export",
           "--clip", f"{out}/clip/export", "--out", f"{out}/bundle"]]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their output exists")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the training stages' wall-clock caps (VQGAN 10 minutes, then the prior and CLIP "
                        "11 minutes side by side): a slower machine buys back quality with time")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    preset = PRESETS[args.preset]
    timings: dict[str, float] = {}
    if args.time_scale <= 0:
        p.error("--time-scale must be positive")
    todo = []
    for name, done, commands in stages(out, preset, args.time_scale):
        if done() and name not in args.force:
            print(f"[{name}] done already, skipped (--force {name} reruns it)")
        else:
            todo.append((name, commands))
    together = {name: commands[0] for name, commands in todo
                if name in preset.side_by_side and len(commands) == 1}
    if len(together) < 2:
        together = {}
    for name, commands in todo:
        if name in together:
            if name == next(iter(together)):
                print(f"\n[{' + '.join(together)}]", flush=True)
                timings.update(_run_side_by_side(together, os.path.join(out, "logs")))
            continue
        print(f"\n[{name}]", flush=True)
        t0 = time.time()
        for cmd in commands:
            _run(cmd)
        timings[name] = round(time.time() - t0, 1)
    from launch.evaluate import write_report

    write_report(out, num_seen=preset.eval_prompts[0], num_heldout=preset.eval_prompts[1],
                 candidates=preset.candidates, scales=preset.scales, temperatures=preset.temperatures,
                 timings=timings)
    print(f"\nreport: {out}/report.md\ngrid:   {out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole pipeline on the synthetic shapes set, from nothing to a ranked image grid and a report.

    python -m demo [--out runs/demo] [--preset full|tiny] [--force STAGE ...] [--time-scale F] [--budget MINUTES]

Each stage is the command a user would type (printed before it runs) and is skipped when its output exists, so a
rerun continues where the last one stopped (a training stage resumes from its last checkpoint). After the VQGAN two
lanes run at the same time, each on half the cores (encode -> tokenizer -> prior, and CLIP), their output in
OUT/logs/STAGE.log. Training stages that start late are shortened to end by the run's budget (full preset: 29
minutes, 6.5 of them kept for the report and the bundle). The report (demo/evaluate.py) evaluates the exported
parts with the shapes oracle and chooses the sampling settings; the last step assembles OUT/bundle with them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Preset:
    samples: int  # shapes rendered (train + val)
    vqgan: list[str] = field(default_factory=list)  # overrides
    bart_prior: list[str] = field(default_factory=list)
    clip_rank: list[str] = field(default_factory=list)
    config: str = "shapes"  # configs/<component>/<config>.yaml
    vocab_size: int = 512
    eval_prompts: tuple[int, int] = (64, 64)  # seen, held-out (fewer made the shares swing by 10+ points)
    candidates: int = 16
    scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    # the first is the scale sweep's; the others are tried at the best scale (each costs about a minute of report)
    temperatures: tuple[float, ...] = (0.85,)
    # CLIP's test-time shift views for the chosen setting (generate.py --rank-shifts): on the shapes set a small
    # shape's corner falls differently on the 8-px patch grid at each offset, and averaging 17 views ranks better
    rank_shifts: int = 2
    minutes: dict[str, float] = field(default_factory=dict)  # wall-clock cap per training stage (trainer.max_time)
    # Lanes of consecutive stages that need only earlier outputs, not each other, run at the same time with the cores
    # split between them, each lane's stages in order: after the VQGAN, one lane encodes the code shards, trains the
    # tokenizer and then the prior on both, the other trains CLIP (it needs only the VQGAN). On 2 CPU cores the
    # small CLIP ran 1.9 steps/s on one thread and 2.3 on two, and the prior keeps about 60% of its two-thread rate.
    lanes: tuple[tuple[str, ...], ...] = (("encode", "tokenizer", "bart_prior"), ("clip_rank",))
    # The whole run's target in minutes (None: the caps alone). A training stage that starts late gets only the time
    # left until budget - reserve (the reserve pays for the bundle and the report), so a slower machine trains a
    # little less instead of running over; both scale with --time-scale.
    budget_minutes: Optional[float] = None
    reserve_minutes: float = 0.0


PRESETS = {
    # minutes: wall-clock caps, set so that the whole demo takes under 30 minutes on a 2-core CPU: the prior's lane
    # first spends a few minutes encoding on one thread, so CLIP's cap is longer and both lanes end together; each
    # run anneals by its cap or its config's max_steps, whichever ends it first, and --time-scale gives slower
    # machines more. The prior learns shape last, in its final minutes, so the lanes get more of the budget than
    # the VQGAN. Scales: guidance between 1 and 1.5 gave the best CLIP-ranked images on the shapes set, 2 and 3
    # are kept as the sweep's reference points. The budget also holds a deadline: a training stage that starts late
    # gets only the time left until 6.5 minutes (the report and the bundle) before the 29-minute mark.
    "full": Preset(samples=24000, minutes={"vqgan": 8, "bart_prior": 12, "clip_rank": 13.5}, scales=(1.0, 1.5, 2.0, 3.0),
                   temperatures=(0.6,), budget_minutes=29, reserve_minutes=6.5),
    # Seconds per stage: exercises every stage and file format (the test suite runs it), not quality.
    "tiny": Preset(samples=400, config="tiny", vocab_size=300, eval_prompts=(3, 3), candidates=4, scales=(1.0, 2.0), temperatures=(1.0, 0.7),
                   vqgan=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"],
                   bart_prior=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"],
                   clip_rank=["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=8"]),
}


def _show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _run(cmd: list[str], prepare: Callable[[list[str]], list[str]] = list) -> None:
    cmd = prepare(cmd)
    print("\n$ " + _show(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _with_threads(cmd: list[str], threads: int) -> list[str]:
    """Pass the thread count on the command line where the command takes one: it shows in the printed command, and
    vqgan.encode would otherwise split all the cores itself (train.py also follows OMP_NUM_THREADS)."""
    if cmd[1:2] == ["train.py"]:
        return [*cmd, f"trainer.num_threads={threads}"]
    if cmd[1:3] == ["-m", "vqgan.encode"]:
        return [*cmd, "--threads", str(threads)]
    return cmd


def _run_lanes(lanes: list[list[tuple[str, list[list[str]]]]], log_dir: str,
               prepare: Callable[[list[str]], list[str]] = list) -> dict[str, float]:
    """Run the lanes at the same time, the CPU cores split evenly between them; a lane runs its stages one after the
    other, each stage's output in ``log_dir/STAGE.log``; ``prepare`` adjusts each command just before it starts.
    Returns each stage's seconds. A failed stage ends its lane;
    once every lane has ended, the end of each failed stage's log is shown and CalledProcessError raised."""
    threads = max(1, (os.cpu_count() or 1) // len(lanes))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    os.makedirs(log_dir, exist_ok=True)
    seconds: dict[str, float] = {}
    failed: list[str] = []

    def run_lane(lane: list[tuple[str, list[list[str]]]]) -> None:
        for name, commands in lane:
            log, t0, code = os.path.join(log_dir, f"{name}.log"), time.time(), 0
            with open(log, "w") as fh:
                for cmd in commands:
                    cmd = prepare(_with_threads(cmd, threads))
                    print(f"\n$ {_show(cmd)} >> {log} 2>&1", flush=True)
                    fh.write(f"$ {_show(cmd)}\n")
                    fh.flush()
                    code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
                    if code != 0:
                        break
            seconds[name] = round(time.time() - t0, 1)
            print(f"  [{name}] finished ({seconds[name]:.0f} s, exit {code})", flush=True)
            if code != 0:
                failed.append(name)
                return

    workers = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes]
    print("  side by side, {} thread(s) each: {} (follow with tail -f {}/*.log)".format(
        threads, "; ".join(" then ".join(n for n, _ in lane) for lane in lanes), log_dir), flush=True)
    for w in workers:
        w.start()
    for w in workers:
        w.join()
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


_CAP = "trainer.max_time="


def _cap(cmd: list[str]) -> Optional[tuple[int, int]]:
    """(argument index, seconds) of a command's ``trainer.max_time`` override (the last one, which wins), or None."""
    at = [i for i, c in enumerate(cmd) if c.startswith(_CAP)]
    if not at:
        return None
    days, hours, minutes, secs = (int(x) for x in cmd[at[-1]][len(_CAP):].split(":"))
    return at[-1], ((days * 24 + hours) * 60 + minutes) * 60 + secs


# A capped training stage ends up to this long after its trainer.max_time (start-up, the last validation, the
# export). A stage never gets less than MIN_CAP_S, even past the deadline.
STAGE_OVERHEAD_S = 30
MIN_CAP_S = 60


def fit_to_deadline(cmd: list[str], deadline: Optional[float], now: Optional[float] = None) -> tuple[list[str], str]:
    """Shorten a training command's ``trainer.max_time`` so that the stage ends by ``deadline`` (a time.time()).

    Returns the command (unchanged when it has no cap, when there is no deadline or when the cap already fits) and a
    line saying what was shortened ("" when nothing was)."""
    found = _cap(cmd)
    if deadline is None or found is None:
        return cmd, ""
    at, cap = found
    left = deadline - (time.time() if now is None else now) - STAGE_OVERHEAD_S
    fitted = max(MIN_CAP_S, int(left))
    if fitted >= cap:
        return cmd, ""
    note = (f"cap {cap / 60:.1f} -> {fitted / 60:.1f} min to end by the demo's deadline"
            + ("" if left >= MIN_CAP_S else " (already past it: the minimum cap)"))
    return [*cmd[:at], _CAP + max_time(fitted / 60), *cmd[at + 1:]], note


def stages(out: str, preset: Preset, time_scale: float = 1.0) -> list[tuple[str, Callable[[], bool], list[list[str]]]]:
    """(name, done?, commands) in order; ``time_scale`` multiplies the training stages' wall-clock caps."""
    py = sys.executable
    shapes, codes, tok = f"{out}/shapes", f"{out}/codes", f"{out}/tokenizer"
    vq_export = f"{out}/vqgan/export"
    common = [f"runs_dir={out}", "resume=auto"]
    img_data = [f"data.train={shapes}/train/*.tar", f"data.val={shapes}/val/*.tar"]
    code_data = [f"data.train={codes}/train/*.tar", f"data.val={codes}/val/*.tar"]

    def train(stage: str, extra: list[str]) -> list[str]:
        cap = [_CAP + max_time(preset.minutes[stage] * time_scale)] if stage in preset.minutes else []
        return [py, "train.py", stage, "--config", f"configs/{stage}/{preset.config}.yaml", f"name={stage}",
                *common, *extra, *cap]

    return [
        ("shapes", lambda: os.path.exists(f"{shapes}/manifest.json"),
         [[py, "-m", "data", "prepare", "shapes", "--out", shapes, "--num-samples", str(preset.samples)]]),
        ("vqgan", lambda: _exported(f"{out}/vqgan"), [train("vqgan", img_data + preset.vqgan)]),
        ("encode", lambda: os.path.exists(f"{codes}/val/.done"),
         [[py, "-m", "vqgan.encode", "--model", vq_export, "--input", f"{shapes}/{split}/*.tar",
           "--output", f"{codes}/{split}"] for split in ("train", "val")]
         + [["touch", f"{codes}/val/.done"]]),
        ("tokenizer", lambda: os.path.exists(f"{tok}/tokenizer.json"),
         [[py, "-m", "bart_prior.tokenizer", "train", "--input", f"{shapes}/train/*.tar",
           "--vocab-size", str(preset.vocab_size), "--out", tok]]),
        ("bart_prior", lambda: _exported(f"{out}/bart_prior"),
         [train("bart_prior", code_data + [f"tokenizer.path={tok}", f"model.vqgan_for_samples={vq_export}"]
                + preset.bart_prior)]),
        ("clip_rank", lambda: _exported(f"{out}/clip_rank"),
         [train("clip_rank", img_data + [f"model.reconstruct_with={vq_export}"] + preset.clip_rank)]),
    ]


def bundle_command(out: str, sampling: dict[str, float]) -> list[str]:
    """The demo's last step: the exported parts and the report's chosen sampling settings, as one bundle."""
    return [sys.executable, "train.py", "bundle", "--vqgan", f"{out}/vqgan/export",
            "--bart-prior", f"{out}/bart_prior/export", "--clip-rank", f"{out}/clip_rank/export",
            *[a for key, value in sampling.items() for a in (f"--{key.replace('_', '-')}", f"{value:g}")],
            "--out", f"{out}/bundle"]


def _bundle_holds(out: str, sampling: dict[str, float]) -> bool:
    path = os.path.join(out, "bundle", "bundle.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("sampling") == sampling
    except (ValueError, AttributeError):  # a damaged bundle.json: the bundle is assembled again
        return False


def run_stages(stage_list: list[tuple[str, Callable[[], bool], list[list[str]]]], lanes_spec, out: str,
               force: list[str], deadline: Optional[float],
               threads: Optional[int] = None) -> tuple[dict[str, float], dict[str, float]]:
    """Run the stages of ``stage_list`` (name, done?, commands) that are not done (or are in ``force``), in order;
    the consecutive stages named in ``lanes_spec`` run side by side (:func:`_run_lanes`, logs in OUT/logs), the
    others in the foreground (with ``threads``, on that many threads each: :func:`_with_threads`). Training commands
    are shortened to end by ``deadline`` (:func:`fit_to_deadline`).
    Returns (seconds per stage run, each training stage's wall-clock cap in minutes)."""
    timings: dict[str, float] = {}
    caps: dict[str, float] = {}

    def prepare(cmd: list[str]) -> list[str]:
        cmd, note = fit_to_deadline(cmd, deadline)
        if threads:
            cmd = _with_threads(cmd, threads)
        if note:
            print(f"  [{cmd[2]}] {note}", flush=True)
        found = _cap(cmd)
        if found is not None:
            caps[cmd[2]] = round(found[1] / 60, 2)
        return cmd

    todo = []
    for name, done, commands in stage_list:
        if done() and name not in force:
            print(f"[{name}] done already, skipped (--force {name} reruns it)")
        else:
            todo.append((name, commands))
    names, commands_of = [name for name, _ in todo], dict(todo)
    lanes = [[(name, commands_of[name]) for name in lane if name in commands_of] for lane in lanes_spec]
    lanes = [lane for lane in lanes if lane] if sum(1 for lane in lanes if lane) > 1 else []
    in_lanes = {name for lane in lanes for name, _ in lane}
    if in_lanes and max(names.index(n) for n in in_lanes) - min(names.index(n) for n in in_lanes) >= len(in_lanes):
        raise SystemExit(f"demo preset: the stages of the lanes {lanes_spec} must be consecutive")
    for name, commands in todo:
        if name in in_lanes:
            if name == min(in_lanes, key=names.index):
                print(f"\n[{' | '.join(' -> '.join(n for n, _ in lane) for lane in lanes)}]", flush=True)
                timings.update(_run_lanes(lanes, os.path.join(out, "logs"), prepare))
            continue
        print(f"\n[{name}]", flush=True)
        t0 = time.time()
        for cmd in commands:
            _run(cmd, prepare)
        timings[name] = round(time.time() - t0, 1)
    return timings, caps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their output exists")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the training stages' wall-clock caps (full preset, minutes: " + ", ".join(
                       f"{k} {v:g}" for k, v in PRESETS["full"].minutes.items()) + "; the prior and CLIP side by "
                       "side): a slower machine buys back quality with time")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="the whole run's target (full preset: {:g}, of which {:g} are left for the bundle and the "
                        "report; scaled by --time-scale): training stages that start late get only the time left "
                        "before it; 0: the caps alone".format(PRESETS["full"].budget_minutes,
                                                              PRESETS["full"].reserve_minutes))
    p.add_argument("--bare-grid", action="store_true", help="grid.png without the prompts and CLIP scores")
    args = p.parse_args(argv)
    started = time.time()
    out = os.path.abspath(args.out)
    preset = PRESETS[args.preset]
    if args.time_scale <= 0:
        p.error("--time-scale must be positive")
    budget = (preset.budget_minutes or 0) if args.budget is None else args.budget
    if budget < 0 or (budget and budget <= preset.reserve_minutes):
        p.error(f"--budget must be 0 or more than the {preset.reserve_minutes:g} minutes left for the report")
    deadline = started + (budget - preset.reserve_minutes) * 60 * args.time_scale if budget else None
    if deadline:
        print(f"budget: {budget * args.time_scale:g} minutes; training ends by "
              f"{time.strftime('%H:%M:%S', time.localtime(deadline))}", flush=True)
    timings, caps = run_stages(stages(out, preset, args.time_scale), preset.lanes, out, args.force, deadline)
    from demo.evaluate import write_report

    sampling = write_report(out, num_seen=preset.eval_prompts[0], num_heldout=preset.eval_prompts[1],
                            candidates=preset.candidates, scales=preset.scales, temperatures=preset.temperatures,
                            rank_shifts=preset.rank_shifts, timings=timings, caps_minutes=caps,
                            bare_grid=args.bare_grid)["sampling"]
    # a stage that ran in this invocation may have changed a part: the bundle is then assembled again
    if _bundle_holds(out, sampling) and not timings and "bundle" not in args.force:
        print("[bundle] done already, skipped (--force bundle reruns it)")
    else:
        print("\n[bundle] the parts with the report's chosen sampling settings", flush=True)
        _run(bundle_command(out, sampling))
    print(f"\nreport: {out}/report/report.md\ngrid:   {out}/report/grid.png\nbundle: {out}/bundle "
          f"(python generate.py --bundle {out}/bundle \"a small red circle in the center on a blue background\" "
          "--out OUT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

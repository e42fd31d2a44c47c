"""VQGAN training-step throughput, peak memory and model FLOPs utilisation (MFU), in both memory layouts, and
against taming-transformers' own training step.

    python bench/vqgan_step.py [--configs tiny shapes f16] [--channels-last both|auto|on|off] [--against taming]
        [--encode-decode] [--precision fp32|bf16] [--steps 2] [--threads N] [--json]

One step = generator forward, L1 + LPIPS (random VGG backbone: same cost as the real one) + PatchGAN term with the
adaptive weight, backward, Adam step; then the discriminator step on the detached reconstruction. FLOPs are
counted with torch's FlopCounterMode on that step; MFU = achieved FLOP/s / the peak of a 2048x2048 matmul measured
in the same run at the same precision (also reported against the better of that and a reference convolution).

``--channels-last``: the memory layout of the model and its input, NHWC (on) or NCHW (off); ``both`` (the default)
times both, ``auto`` the one training picks on this device (core.hardware.resolve_channels_last).
``--against taming`` (f16 only) adds taming-transformers' own ``VQModel`` with its ``VQLPIPSWithDiscriminator``
(bench/_taming.py: random VGG as ours), stepped as Lightning 1.x steps it: one ``training_step`` per optimizer, each
with its own generator forward. ``--encode-decode`` times inference (``VQGAN.encode`` / ``decode``, batch as above)
in both layouts instead of training.

The variants of a configuration (layouts, taming) run in one process, built once, and are timed in turn, step by
step (``--steps`` rounds; the fastest round of each is reported, with the median), so that a change in the machine's
load hits all of them alike. On CPU each configuration runs in its own process and peak memory is that process's max
RSS over all its variants (the idle-process baseline is printed too); on GPU it is torch.cuda.max_memory_allocated
per variant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.hardware import resolve_channels_last  # noqa: E402
from vqgan.loss import LossConfig, VQLoss  # noqa: E402
from vqgan.model import VQGAN, preset  # noqa: E402

CONFIGS = {  # name: (preset, batch, LPIPS on)
    "tiny": ("tiny", 8, False),
    "shapes": ("shapes", 32, False),
    "f16": ("f16-16384", 1, True),
}
LAYOUTS = {"on": [True], "off": [False], "both": [False, True]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(precision: str, device: str):
    return torch.autocast(device, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def matmul_peak(precision: str, device: str, n: int = 2048, reps: int = 10) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def conv_peak(precision: str, device: str, reps: int = 5) -> float:
    """A 3x3 128->128 channels-last convolution at 64x64, batch 4: oneDNN/cuDNN's own best case. On AMD CPUs MKL's
    fp32 sgemm takes a slower path than oneDNN's convolutions, so the matmul alone can understate the peak."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(4, 128, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad(), _autocast(precision, device):
        conv(x)
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            conv(x)
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * 9 * 128 * 128 * 64 * 64 * 4 / best


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def ours(name: str, channels_last: bool, precision: str, device: str) -> tuple[Callable[[], None], torch.nn.Module]:
    """This project's training step (what vqgan/training.py does per batch, without Lightning's bookkeeping)."""
    preset_name, batch, use_lpips = CONFIGS[name]
    torch.manual_seed(0)
    model = VQGAN(preset(preset_name)).to(device)
    loss = VQLoss(LossConfig(perceptual_weight=1.0 if use_lpips else 0.0, lpips_backbone="random",
                             disc_ndf=64 if use_lpips else 16, disc_layers=3 if use_lpips else 2)).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        loss.to(memory_format=torch.channels_last)
    model.train()
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    r = model.config.resolution
    x = _layout(torch.rand(batch, 3, r, r, device=device) * 2 - 1, channels_last)

    def step() -> None:
        loss.discriminator.requires_grad_(False)
        with _autocast(precision, device):
            xrec, q = model(x)
            g, _ = loss.generator_loss(x, xrec, q.loss, model.decoder.last_layer, step=0)
        g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        loss.discriminator.requires_grad_(True)
        with _autocast(precision, device):
            d, _ = loss.discriminator_loss(x, xrec.detach())
        d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    return step, model


def taming(name: str, precision: str, device: str) -> tuple[Callable[[], None], torch.nn.Module]:
    """taming-transformers' VQModel + VQLPIPSWithDiscriminator at the f16 config, stepped as Lightning 1.x does."""
    from bench import _taming

    if name != "f16":
        raise SystemExit("--against taming compares the f16 config (taming's vqgan_imagenet_f16_16384)")
    _, batch, _ = CONFIGS[name]
    torch.manual_seed(0)
    model, optimizers = _taming.f16_model(device)
    x = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1  # taming's get_input: contiguous NCHW

    def step() -> None:
        with _autocast(precision, device):
            _taming.training_step(model, optimizers, x, global_step=1)

    return step, model


def coder(name: str, channels_last: bool, device: str) -> tuple[Callable[[], None], torch.nn.Module]:
    """Inference: encode a batch to codes, then decode the codes (VQGAN.encode / decode, as vqgan.encode and the
    pipeline run them), in the given layout (from_pretrained loads NHWC)."""
    preset_name, batch, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = VQGAN(preset(preset_name)).to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    r = model.config.resolution
    x = torch.rand(batch, 3, r, r, device=device) * 2 - 1

    def step() -> None:
        model.decode(model.encode(x))

    return step, model


def _label(kind: str, channels_last: bool) -> str:
    return f"{kind} {'NHWC' if channels_last else 'NCHW'}"


def bench_one(name: str, precision: str, steps: int, device: str, layout: str, against: str | None,
              encode_decode: bool) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    preset_name, batch, use_lpips = CONFIGS[name]
    layouts = [resolve_channels_last("auto", device)] if layout == "auto" else LAYOUTS[layout]
    builders: list[tuple[str, Callable[[], tuple[Callable[[], None], torch.nn.Module]]]] = []
    for cl in layouts:
        if encode_decode:
            builders.append((_label("encode+decode", cl), lambda cl=cl: coder(name, cl, device)))
        else:
            builders.append((_label("ours", cl), lambda cl=cl: ours(name, cl, precision, device)))
    if against == "taming" and not encode_decode:
        builders.append(("taming NCHW", lambda: taming(name, precision, device)))
    peak_before = matmul_peak(precision, device)
    variants = []
    for label, build in builders:
        step, model = build()
        with FlopCounterMode(display=False) as counter:
            step()  # also the warm-up
        variants.append({"label": label, "step": step, "flops": counter.get_total_flops(), "times": [], "mem": 0,
                         "params": sum(p.numel() for p in model.parameters())})
    for _ in range(steps):  # interleaved: each round times every variant once
        for v in variants:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t = time.perf_counter()
            v["step"]()
            _sync(device)
            v["times"].append(time.perf_counter() - t)
            if device == "cuda":
                v["mem"] = max(v["mem"], torch.cuda.max_memory_allocated())
    # best of two measurements, before and after the timed steps: other processes share the CPU
    peak = max(peak_before, matmul_peak(precision, device))
    best_peak = max(peak, conv_peak(precision, device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = []
    for v in variants:
        dt = min(v["times"])
        rows.append({
            "config": name, "variant": v["label"], "preset": preset_name, "params_M": round(v["params"] / 1e6, 2),
            "resolution": 256 if v["label"].startswith("taming") else preset(preset_name).resolution,
            "batch": batch, "lpips": use_lpips, "precision": precision, "device": device,
            "threads": torch.get_num_threads(), "rounds": len(v["times"]), "step_s": round(dt, 4),
            "median_step_s": round(statistics.median(v["times"]), 4), "images_per_s": round(batch / dt, 2),
            "gflop_per_step": round(v["flops"] / 1e9, 1), "achieved_gflops": round(v["flops"] / dt / 1e9, 1),
            "matmul_peak_gflops": round(peak / 1e9, 1), "mfu": round(v["flops"] / dt / peak, 3),
            "conv_peak_gflops": round(best_peak / 1e9, 1), "mfu_vs_best": round(v["flops"] / dt / best_peak, 3),
            "peak_mem_MiB": round((v["mem"] if device == "cuda" else rss) / 2 ** 20)})
    base = rows[0]["step_s"]
    for r in rows:  # the first variant's step time over each one's: > 1 is faster than the first
        r["speed_vs_first"] = round(base / r["step_s"], 3)
    return rows


def _print(res: dict) -> None:
    print(f"{res['config']:>7} {res['variant']:<20} {res['params_M']:>6.2f}M {res['resolution']}px batch "
          f"{res['batch']} {res['precision']} {res['threads']} thr: {res['images_per_s']:>7.2f} img/s "
          f"({res['step_s'] * 1000:.0f} ms/step, median {res['median_step_s'] * 1000:.0f} of {res['rounds']}; "
          f"{res['speed_vs_first']:.2f}x the first row), {res['gflop_per_step']} GFLOP/step, "
          f"{res['achieved_gflops']} GFLOP/s of {res['matmul_peak_gflops']} matmul peak = MFU {res['mfu']:.1%} "
          f"({res['mfu_vs_best']:.1%} of the best of matmul/conv peaks, {res['conv_peak_gflops']}), peak mem "
          f"{res['peak_mem_MiB']} MiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                    help="default: all three (f16 alone with --against taming)")
    ap.add_argument("--channels-last", choices=["both", "auto", "on", "off"], default="both",
                    help="memory layout of our model: both (default), auto (what training picks here), on, off")
    ap.add_argument("--against", choices=["taming"], help="add taming-transformers' own training step (f16)")
    ap.add_argument("--encode-decode", action="store_true", help="time VQGAN.encode + decode instead of training")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=2, help="timed rounds (each times every variant once)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: run one config, print JSON
    args = ap.parse_args(argv)
    configs = args.configs or (["f16"] if args.against else list(CONFIGS))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(bench_one(args.one, args.precision, args.steps, args.device, args.channels_last,
                                   args.against, args.encode_decode)), flush=True)
        return 0
    if args.device == "cpu":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"idle process max RSS (torch imported): {base:.0f} MiB", flush=True)
    for name in configs:
        if args.device == "cpu":
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--precision", args.precision,
                   "--steps", str(args.steps), "--threads", str(args.threads), "--device", "cpu",
                   "--channels-last", args.channels_last, *(["--against", args.against] if args.against else []),
                   *(["--encode-decode"] if args.encode_decode else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            rows = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            rows = bench_one(name, args.precision, args.steps, args.device, args.channels_last, args.against,
                             args.encode_decode)
        for res in rows:
            print(json.dumps(res), flush=True) if args.json else _print(res)
        theirs = [r for r in rows if r["variant"].startswith("taming")]
        for r in rows:
            if theirs and r is not theirs[0]:
                print(f"{name:>7} {r['variant']} against taming's step: {theirs[0]['step_s'] / r['step_s']:.2f}x "
                      f"faster (fastest rounds; medians {theirs[0]['median_step_s'] / r['median_step_s']:.2f}x)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

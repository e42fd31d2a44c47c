"""VQGAN training-step throughput, peak memory and model FLOPs utilisation (MFU).

    python bench/vqgan_step.py [--configs tiny shapes f16] [--precision fp32|bf16] [--steps 2] [--threads N] [--json]

One step = generator forward, L1 + LPIPS (random VGG backbone: same cost as the real one) + PatchGAN term with the
adaptive weight, backward, Adam step; then the discriminator step on the detached reconstruction. FLOPs are
counted with torch's FlopCounterMode on that step; MFU = achieved FLOP/s / the peak of a 2048x2048 matmul measured
in the same run at the same precision (also reported against the better of that and a reference convolution). On CPU each configuration runs in its own process and peak memory is that
process's max RSS (the idle-process baseline is printed too); on GPU it is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqgan.loss import LossConfig, VQLoss  # noqa: E402
from vqgan.model import VQGAN, preset  # noqa: E402

CONFIGS = {  # name: (preset, batch, LPIPS on)
    "tiny": ("tiny", 8, False),
    "shapes": ("shapes", 32, False),
    "f16": ("f16-16384", 1, True),
}


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


def bench_one(name: str, precision: str, steps: int, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    preset_name, batch, use_lpips = CONFIGS[name]
    torch.manual_seed(0)
    model = VQGAN(preset(preset_name)).to(device).to(memory_format=torch.channels_last).train()
    loss = VQLoss(LossConfig(perceptual_weight=1.0 if use_lpips else 0.0, lpips_backbone="random",
                             disc_ndf=64 if use_lpips else 16, disc_layers=3 if use_lpips else 2)).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    r = model.config.resolution
    x = (torch.rand(batch, 3, r, r, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)

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

    peak_before = matmul_peak(precision, device)
    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    flops = counter.get_total_flops()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    dt = min(times)
    # best of two measurements, before and after the timed steps: other processes share the CPU
    peak = max(peak_before, matmul_peak(precision, device))
    best_peak = max(peak, conv_peak(precision, device))
    mem = (torch.cuda.max_memory_allocated() if device == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": name, "preset": preset_name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "resolution": r, "batch": batch, "lpips": use_lpips, "precision": precision, "device": device,
            "threads": torch.get_num_threads(), "step_s": round(dt, 4), "images_per_s": round(batch / dt, 2),
            "gflop_per_step": round(flops / 1e9, 1), "achieved_gflops": round(flops / dt / 1e9, 1),
            "matmul_peak_gflops": round(peak / 1e9, 1), "mfu": round(flops / dt / peak, 3),
            "conv_peak_gflops": round(best_peak / 1e9, 1), "mfu_vs_best": round(flops / dt / best_peak, 3),
            "peak_mem_MiB": round(mem / 2 ** 20)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: run one config, print JSON
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(bench_one(args.one, args.precision, args.steps, args.device)), flush=True)
        return 0
    if args.device == "cpu":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"idle process max RSS (torch imported): {base:.0f} MiB", flush=True)
    for name in args.configs:
        if args.device == "cpu":
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--precision", args.precision,
                   "--steps", str(args.steps), "--threads", str(args.threads), "--device", "cpu"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            res = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            res = bench_one(name, args.precision, args.steps, args.device)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            print(f"{name:>7} {res['params_M']:>6.2f}M {res['resolution']}px batch {res['batch']} {res['precision']} "
                  f"{res['threads']} thr: {res['images_per_s']:>7.2f} img/s ({res['step_s'] * 1000:.0f} ms/step), "
                  f"{res['gflop_per_step']} GFLOP/step, {res['achieved_gflops']} GFLOP/s of "
                  f"{res['matmul_peak_gflops']} matmul peak = MFU {res['mfu']:.1%} ({res['mfu_vs_best']:.1%} of the "
                  f"best of matmul/conv peaks, {res['conv_peak_gflops']}), peak mem {res['peak_mem_MiB']} MiB",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CLIP throughput: training pairs/s (forward + backward + AdamW step) and ranker scoring images/s.

    python -m bench.clip_step [--archs tiny ViT-B-32] [--batch 8] [--steps 3] [--precision bf16|fp32]
        [--attention auto|default|math|flash] [--json]

Random weights, synthetic [-1, 1] images and caption strings (tokenisation is included, as in training).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_rank.io import build_clip  # noqa: E402
from clip_rank.ranker import ClipRanker  # noqa: E402
from clip_rank.training import make_clip_loss, param_groups  # noqa: E402
from core.hardware import attention_backends  # noqa: E402

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
SHAPES = {"embed_dim": 128,
          "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
          "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}
CUSTOM = {"tiny": TINY, "shapes": SHAPES}


def _autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _attention(choice: str, precision: str, device: str):
    """The kernels training would use under ``trainer.attention: choice`` (core/hardware.py)."""
    backends = attention_backends(choice, "gpu" if device.startswith("cuda") else "cpu",
                                  "bf16-mixed" if precision == "bf16" else "32-true")
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()


def bench_arch(arch: str, batch: int, steps: int, precision: str, device: str, attention: str = "auto") -> dict:
    torch.manual_seed(0)
    model = build_clip(arch=CUSTOM[arch], pretrained="scratch") if arch in CUSTOM else \
        build_clip(name=arch, pretrained="scratch")
    model.to(device).train()
    h, w = model.image_size
    images = torch.rand(batch, 3, h, w, device=device) * 2 - 1
    captions = [f"a small red circle in the top left on a blue background {i}" for i in range(batch)]
    optimizer = torch.optim.AdamW(param_groups(model.clip, 0.1), lr=1e-4, fused=True)
    loss_fn = make_clip_loss()

    def train_step() -> None:
        with _autocast(precision, device), _attention(attention, precision, device):
            img, txt, scale = model(images, captions)
        loss = loss_fn(img.float(), txt.float(), scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()  # warm-up: allocator, kernels
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_s = (time.perf_counter() - t0) / steps

    ranker = ClipRanker(model.eval(), device=device, batch_size=batch)
    with _autocast(precision, device):
        ranker.score(captions[0], images)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            ranker.score(captions[0], images)
        _sync(device)
    score_s = (time.perf_counter() - t0) / steps
    return {"arch": arch, "params_M": round(model.num_parameters() / 1e6, 2), "image_size": h, "batch": batch,
            "precision": precision, "attention": attention, "device": device, "train_step_s": round(train_s, 4),
            "train_pairs_per_s": round(batch / train_s, 1), "score_images_per_s": round(batch / score_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny", "shapes", "ViT-B-32"],
                        help="tiny | shapes | any open_clip architecture name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--attention", default="auto", help="the training step's attention kernel, as "
                        "trainer.attention: auto (math on a CPU in bf16) | default (torch's choice) | math | flash")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="one JSON line per architecture")
    args = parser.parse_args(argv)
    for arch in args.archs:
        result = bench_arch(arch, args.batch, args.steps, args.precision, args.device, args.attention)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{arch:>10} {result['params_M']:>7.2f}M {result['image_size']}px batch {args.batch} "
                  f"{args.precision}, attention {args.attention}: train {result['train_pairs_per_s']:>8.1f} pairs/s "
                  f"({result['train_step_s'] * 1000:.0f} ms/step), score {result['score_images_per_s']:>8.1f} "
                  "images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

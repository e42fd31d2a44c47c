"""Memory per rank for fine-tuning the DALL·E Mini / Mega prior under FSDP2, computed from the model itself.

    python -m bench.prior_memory [--variants mini mega] [--gpus 1 8 32] [--batch 8] [--optimizer adamw adafactor]

The model is built on the meta device (no memory, no weights); parameters, gradients and optimizer state are counted
from its tensors, and activations by running one forward pass on meta tensors with a saved-tensor hook that adds up
every tensor autograd keeps for the backward pass (with activation checkpointing: each layer's input, plus one
layer's own activations while it is recomputed). Assumptions, stated in the table: FSDP2 shards fp32 parameters,
gradients and optimizer state evenly over the ranks; bf16 mixed precision gathers one layer's bf16 parameters at a
time (two with prefetching); activations are bf16 (2 bytes), as autocast keeps matmul inputs; the allocator's
fragmentation, CUDA context and communication buffers (typically 1-3 GiB) are not included.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

import torch

GIB = 2 ** 30


def _optimizer_bytes(model: torch.nn.Module, name: str) -> int:
    """fp32 optimizer state: AdamW keeps two moments; Adafactor (no momentum) factors each matrix's second moment
    into a row and a column vector, and keeps a full one for vectors."""
    if name == "adamw":
        return 8 * sum(p.numel() for p in model.parameters())
    return 4 * sum(p.shape[0] + p.shape[1] if p.dim() == 2 else p.numel() for p in model.parameters())


@contextmanager
def _count_saved(total: list[int]) -> Iterator[None]:
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in seen and t.device.type == "meta" and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def activation_elements(model, batch: int, text_len: int) -> tuple[int, int, int]:
    """(all saved elements, the largest single layer's, the layer inputs kept under checkpointing) for one forward
    pass of ``batch`` captions of ``text_len`` tokens and full code sequences."""
    cfg = model.cfg
    ids = torch.zeros(batch, text_len, dtype=torch.long, device="meta")
    mask = torch.ones(batch, text_len, dtype=torch.long, device="meta")
    codes = torch.zeros(batch, cfg.seq_len, dtype=torch.long, device="meta")
    total = [0]
    with _count_saved(total):
        logits = model(ids, mask, model.decoder_inputs(codes))
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    per_layer = []
    for stack, length in ((model.encoder, text_len), (model.decoder, cfg.seq_len)):
        layer = stack.layers[0]
        one = [0]
        x = torch.zeros(batch, length, cfg.d_model, device="meta", requires_grad=True)
        with _count_saved(one):
            if stack is model.encoder:
                layer(x, mask)
            else:
                layer(x, torch.zeros(batch, text_len, cfg.d_model, device="meta"), mask)
        per_layer.append(one[0])
    inputs = batch * cfg.d_model * (text_len * len(model.encoder.layers) + cfg.seq_len * len(model.decoder.layers))
    return total[0], max(per_layer), inputs


def rows(variant: str, gpus: list[int], batch: int, optimizers: list[str]) -> list[str]:
    from bart_prior import build_model, preset

    with torch.device("meta"):
        model = build_model(preset(variant))
    n = model.num_parameters()
    largest_layer = max(sum(p.numel() for p in layer.parameters())
                        for layer in [*model.encoder.layers, *model.decoder.layers])
    text_len = model.cfg.max_text_length
    saved, one_layer, inputs = activation_elements(model, batch, text_len)
    act_plain, act_ckpt = 2 * saved, 2 * (inputs + one_layer)
    gathered = 2 * 2 * largest_layer  # bf16 copies of the current and the prefetched layer
    out = []
    for opt in optimizers:
        state = 4 * n + 4 * n + _optimizer_bytes(model, opt)  # fp32 params, fp32 grads, optimizer
        for g in gpus:
            sharded = state / g
            out.append(f"| {variant} | {n / 1e9:.2f} B | {opt} | {g} | {4 * n / g / GIB:.2f} | {4 * n / g / GIB:.2f} | "
                       f"{_optimizer_bytes(model, opt) / g / GIB:.2f} | {gathered / GIB:.2f} | "
                       f"{act_plain / GIB:.2f} | {act_ckpt / GIB:.2f} | "
                       f"{(sharded + gathered + act_plain) / GIB:.1f} | {(sharded + gathered + act_ckpt) / GIB:.1f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["mini", "mega"])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--optimizer", nargs="+", default=["adamw", "adafactor"], choices=["adamw", "adafactor"])
    args = p.parse_args(argv)
    print(f"GiB per rank, batch {args.batch} per rank, 64 caption tokens, 256 codes; FSDP2 with bf16 mixed precision "
          "(fp32 master parameters, gradients and optimizer state sharded over the ranks)\n")
    print("| model | parameters | optimizer | GPUs | params | grads | optimizer state | gathered bf16 layers | "
          "activations | activations, checkpointed | total | total, checkpointed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        print("\n".join(rows(variant, args.gpus, args.batch, args.optimizer)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

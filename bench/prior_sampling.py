"""Prior sampling and training speed.

    python -m bench.prior_sampling [--preset shapes --codebook-size 512 --grid 16 16] [--prior DIR] [--device cuda]

Sampling (guidance on, top-k): tokens/s for 1 and 16 candidates with
  ours        BartPrior.generate (fp32): KV cache, cross-attention K/V once per prompt, cond+uncond rows in one
              batch sharing the first self-attention block;
  ours_bf16   the same with precision="bf16" (matrix products in bf16; attention, cache and sampling in fp32);
  no_cache    the same loop recomputing the whole prefix every step;
  hf_generate transformers' generate() (its own cache) with guidance as a second decoder pass per step
              (dalle-mini's way), done by a LogitsProcessor holding the unconditional branch's cache;
  hf_bf16     the same under torch.autocast(bf16).
"vs best hf" divides the faster of hf_generate and hf_bf16 by each method's time.
Timings are the median of --repeats interleaved runs. A greedy run checks that ours and hf_generate pick the same
codes. Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak resident-set growth during the call
(polled every 2 ms, after handing freed heap memory back to the OS).
Training: tokens/s of AdamW steps and model FLOPs utilisation against a matmul peak measured in the same run.

    python -m bench.prior_sampling --min-dalle [--layers 2] [--candidates 16] [--repeats 2]

times this sampler against min-dalle 0.4.11's own sampling loop on the same weights instead: a DalleBart at DALL·E
Mini's width (d_model 1024, 16 heads, GLU 2730; --layers encoder and decoder layers each, 12 in the published
model), written as min-dalle's files and loaded into its classes, guidance scale 16, top-k 256, fp32, the same
caption ids and start token for both, interleaved repeats; a greedy run (top-k 1) checks that both pick the same
codes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Callable

import torch

from bart_prior import BartPrior, preset, train_tokenizer


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Hand freed heap memory back to the OS, so RSS growth counts this call's allocations, not reuse."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak extra memory in MiB, result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20, out
    _trim()
    base, peak, stop = _rss(), [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return dt, max(0, peak[0] - base) / 2**20, out


def hf_generate(prior: BartPrior, prompt: str, n: int, scale: float, top_k: int, greedy: bool = False) -> torch.Tensor:
    """transformers' generate() with super-conditioning as a second decoder pass per step."""
    from transformers import BartConfig, BartForConditionalGeneration, LogitsProcessor, LogitsProcessorList
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    m, cfg = prior.model, prior.config
    hf_cfg = BartConfig(vocab_size=cfg.codebook_size + 1, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.attention_heads,
                        decoder_attention_heads=cfg.attention_heads, max_position_embeddings=cfg.seq_len,
                        pad_token_id=cfg.text_pad_token_id, bos_token_id=None, eos_token_id=None,
                        forced_eos_token_id=None, decoder_start_token_id=cfg.start_token_id)
    with torch.device("meta"):  # a shell: its modules are replaced by the prior's own below
        hf = BartForConditionalGeneration(hf_cfg)
    hf.model.encoder, hf.model.decoder, hf.lm_head = m.encoder, m.decoder, m.lm_head  # share the weights
    hf.model.shared = m.decoder.embed_tokens
    hf.register_buffer("final_logits_bias", torch.zeros(1, cfg.codebook_size + 1))
    hf = hf.to(next(m.parameters()).device).eval()
    device = hf.device
    empty = prior.empty_prompt_ids().to(device)[None]

    class UnconditionalPass(LogitsProcessor):
        def __init__(self) -> None:
            dc = m.decoder.config
            self.cache = EncoderDecoderCache(DynamicCache(config=dc), DynamicCache(config=dc))
            self.enc = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.enc is None:
                self.enc = m.encode(empty, torch.ones_like(empty)).expand(input_ids.shape[0], -1, -1)
            h = m.decoder(input_ids=input_ids[:, -1:], encoder_hidden_states=self.enc, cache=self.cache,
                          use_cache=True).last_hidden_state
            uncond = hf.lm_head(h[:, -1]).float()
            return uncond + scale * (scores - uncond)  # scores hold -inf at the suppressed start token

    ids, mask = prior.encode_prompts([prompt])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not greedy,
                          top_k=None if greedy else top_k, num_return_sequences=n, max_new_tokens=cfg.seq_len,
                          min_new_tokens=cfg.seq_len, suppress_tokens=[cfg.start_token_id],
                          logits_processor=LogitsProcessorList([UnconditionalPass()]),
                          decoder_start_token_id=cfg.start_token_id, use_cache=True)
    return out[:, 1:]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_flops_per_sample(prior: BartPrior, text_len: int) -> float:
    """3x the forward matmul FLOPs (weights + attention scores/values) of one caption/code-sequence pair."""
    m, c = prior.model, prior.config
    L, d = c.seq_len, c.d_model
    enc = sum(p.numel() for n, p in m.encoder.layers.named_parameters() if p.ndim == 2)
    dec = sum(p.numel() for n, p in m.decoder.layers.named_parameters() if p.ndim == 2)
    fwd = 2 * enc * text_len + 2 * (dec + m.lm_head.weight.numel()) * L
    fwd += c.encoder_layers * 4 * text_len**2 * d + c.decoder_layers * (4 * L * L * d + 4 * L * text_len * d)
    return 3.0 * fwd


def bench_training(prior: BartPrior, device: torch.device, batch: int, steps: int, precision: str) -> dict:
    m, c = prior.model.to(device).train(), prior.config
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    captions = [f"a red circle number {i}" for i in range(batch)]
    ids, mask = prior.encode_prompts(captions, warn=False)
    ids, mask = ids.to(device), mask.to(device)
    codes = torch.randint(0, c.codebook_size, (batch, c.seq_len), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            logits = m(ids, mask, m.decoder_inputs(codes))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    dt, _, _ = measure(lambda: [step() for _ in range(steps)], device)
    peak = matmul_peak(device, dtype)
    achieved = train_flops_per_sample(prior, ids.shape[1]) * batch * steps / dt
    m.eval()
    return {"batch": batch, "precision": precision, "steps_per_s": steps / dt,
            "tokens_per_s": batch * c.seq_len * steps / dt, "model_tflops": achieved / 1e12,
            "matmul_peak_tflops": peak / 1e12, "mfu": achieved / peak}


def min_dalle_row(args: argparse.Namespace) -> dict:
    """This sampler against min-dalle's on the same DALL·E Mini-width weights (see the module docstring)."""
    from bart_prior import PriorConfig
    from bart_prior.convert import MIN_DALLE_START, write_min_dalle
    from bench._min_dalle import load_min_dalle, min_dalle_sample

    d, heads, glu, layers = 1024, 16, 2730, args.layers
    with tempfile.TemporaryDirectory() as tmp:
        words = "a red green blue car cat dog house tree sky sea photo of the on in at".split()
        tok = train_tokenizer([" ".join(words[(i * 5 + j) % len(words)] for j in range(6)) for i in range(200)], 400,
                              os.path.join(tmp, "tok"), min_frequency=1)
        torch.manual_seed(0)
        cfg = PriorConfig(arch="dallebart", codebook_size=16384, image_vocab_size=16384, start_token=MIN_DALLE_START,
                          grid=[16, 16], d_model=d, encoder_layers=layers, decoder_layers=layers, attention_heads=heads,
                          ffn_dim=glu, max_text_length=64)
        prior = BartPrior(cfg, tok).eval()
        write_min_dalle(prior, tmp, "mini")
        enc, dec = load_min_dalle(tmp, "_mini", layers, d, heads, glu, prior.config.text_vocab_size, 16384)
    prompt = "a photo of a red car in the sea"
    ids = prior.encode_prompts([prompt])[0][0].tolist()
    n, scale, top_k = args.candidates[-1], 16.0, 256

    def ours(k: int = top_k, images: int = n) -> torch.Tensor:
        return prior.generate([prompt], images, condition_scale=scale, top_k=k, temperature=1.0, precision="fp32")[0]

    def theirs(k: int = top_k, images: int = n) -> torch.Tensor:
        return min_dalle_sample(enc, dec, ids, images, scale, top_k=k, temperature=1.0, start=MIN_DALLE_START)

    greedy_agree = bool(torch.equal(ours(1, 1), theirs(1, 1)))
    times: dict[str, list[float]] = {"ours": [], "min_dalle": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("min_dalle", theirs)):
            times[name].append(measure(fn, torch.device("cpu"))[0])
    row = {name: statistics.median(t) for name, t in times.items()}
    row |= {"speedup": row["min_dalle"] / row["ours"], "greedy_agree": greedy_agree, "candidates": n,
            "layers": layers, "params": prior.model.num_parameters()}
    print(f"DalleBart d_model {d}, {layers}+{layers} layers ({row['params'] / 1e6:.0f}M parameters), {n} candidates, "
          f"scale {scale:g}, top-k {top_k}, fp32, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"  ours       {n * 256 / row['ours']:7.0f} tok/s  {row['ours']:6.2f} s")
    print(f"  min-dalle  {n * 256 / row['min_dalle']:7.0f} tok/s  {row['min_dalle']:6.2f} s")
    print(f"  ours / min-dalle: x{row['speedup']:.2f}; greedy codes identical: {greedy_agree}")
    return row


def build_prior(args: argparse.Namespace) -> BartPrior:
    if args.prior:
        return BartPrior.from_pretrained(args.prior)
    with tempfile.TemporaryDirectory() as tmp:
        words = "red green blue yellow circle square triangle small large left right top bottom on the a".split()
        caps = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
        tok = train_tokenizer(caps, 400, os.path.join(tmp, "tok"), min_frequency=1)
    torch.manual_seed(0)
    return BartPrior(preset(args.preset, codebook_size=args.codebook_size, grid=list(args.grid)), tok)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", help="a BartPrior folder (default: a randomly initialised preset)")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--grid", type=int, nargs=2, default=[16, 16])
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 16])
    p.add_argument("--condition-scale", type=float, default=3.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--skip-no-cache", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings per method; the median is reported")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on a shared machine spinning OpenMP workers distort timings")
    p.add_argument("--min-dalle", action="store_true", help="time against min-dalle's sampling loop instead")
    p.add_argument("--layers", type=int, default=2, help="with --min-dalle: encoder and decoder layers each")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.min_dalle:
        report = {"min_dalle": min_dalle_row(args)}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=2)
        return report
    prior = build_prior(args).to(device).eval()
    c = prior.config
    prompt = "a small red circle on the left"
    report = {"device": str(device), "threads": torch.get_num_threads(), "params": prior.model.num_parameters(),
              "seq_len": c.seq_len, "codebook_size": c.codebook_size, "sampling": []}
    print(f"prior: {report['params'] / 1e6:.2f}M params, {c.seq_len} codes of {c.codebook_size}, {device}")
    short = dict(condition_scale=args.condition_scale, temperature=0)
    ours_greedy = prior.generate([prompt], 1, **short)[0]
    hf_greedy = hf_generate(prior, prompt, 1, args.condition_scale, args.top_k, greedy=True).cpu()
    report["greedy_agree"] = bool(torch.equal(ours_greedy, hf_greedy))
    print(f"greedy guided codes identical to transformers generate(): {report['greedy_agree']}")
    kw = dict(condition_scale=args.condition_scale, top_k=args.top_k, seed=0)
    for n in args.candidates:
        def hf_bf16() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return hf_generate(prior, prompt, n, args.condition_scale, args.top_k)

        methods = {"ours": lambda: prior.generate([prompt], n, **kw),
                   "ours_bf16": lambda: prior.generate([prompt], n, precision="bf16", **kw),
                   "no_cache": lambda: prior.generate([prompt], n, use_cache=False, **kw),
                   "hf_generate": lambda: hf_generate(prior, prompt, n, args.condition_scale, args.top_k),
                   "hf_bf16": hf_bf16}
        if args.skip_no_cache:
            methods.pop("no_cache")
        row = {"candidates": n}
        times: dict[str, list[float]] = {name: [] for name in methods}
        mems: dict[str, float] = {name: 0.0 for name in methods}
        for rep in range(args.repeats):  # interleaved, so a burst of load on a shared machine hits every method
            for name, fn in methods.items():
                if name == "no_cache" and rep:
                    continue  # slow and far behind: once is enough
                dt, mem, _ = measure(fn, device)
                times[name].append(dt)
                mems[name] = max(mems[name], mem)
        for name in methods:
            dt = statistics.median(times[name])
            row[name] = {"seconds": dt, "tokens_per_s": n * c.seq_len / dt, "peak_mib": mems[name]}
        best_hf = min(row["hf_generate"]["seconds"], row["hf_bf16"]["seconds"])
        for name in methods:
            row[name]["vs_best_hf"] = best_hf / row[name]["seconds"]
        report["sampling"].append(row)
        print(f"candidates={n}:")
        for k, v in row.items():
            if isinstance(v, dict):
                print(f"  {k:12s} {v['tokens_per_s']:7.0f} tok/s  {v['seconds']:6.2f} s  peak {v['peak_mib']:4.0f} MiB"
                      f"  vs best hf x{v['vs_best_hf']:.2f}")
    report["training"] = bench_training(prior, device, args.train_batch, args.train_steps, args.precision)
    t = report["training"]
    print(f"training: batch {t['batch']} {t['precision']}: {t['steps_per_s']:.2f} steps/s, "
          f"{t['tokens_per_s']:.0f} tokens/s, {t['model_tflops'] * 1e3:.1f} GFLOP/s of "
          f"{t['matmul_peak_tflops'] * 1e3:.0f} matmul peak = MFU {t['mfu']:.1%}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()

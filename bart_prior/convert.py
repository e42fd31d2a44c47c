"""Convert the published DALL·E Mini / Mega priors to and from a ``BartPrior`` folder (``model.arch: dallebart``).

    python -m bart_prior.convert --from dalle-mini DIR --out OUT
    python -m bart_prior.convert --from min-dalle DIR [--variant mini|mega] [--heads N] --out OUT
    python -m bart_prior.convert --from folder DIR --to min-dalle OUT --variant mini|mega [--dtype float16]
    python -m bart_prior.convert --from folder DIR --to dalle-mini OUT [--dtype float16]

Any source goes to any target. dalle-mini: ``config.json`` + ``flax_model.msgpack`` (scanned or unscanned layers,
fp16 or fp32) + ``vocab.json`` / ``merges.txt``; min-dalle: ``encoder[_mini].pt``, ``decoder[_mini].pt``,
``vocab[_mini].json``, ``merges[_mini].txt``. Sizes come from config.json where there is one, else from the tensors;
heads from the config, else d_model / 64 (the published head width) unless ``--heads``.
Start token: dalle-mini's ``decoder_start_token_id`` (else the image vocabulary size, as it trained); min-dalle
0.4.11 starts decoding from 16383 (2**14 - 1, a real code), so a min-dalle-sourced folder gets ``start_token: 16383``
and generates what min-dalle generates. ``normalize_text``: dalle-mini's config key (absent: off, its default); on
for min-dalle (the same checkpoints). The codebook is 16384 codes; image ids past it (Mega's 16415) are never sampled.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from bart_prior.dallebart import BiasOnlyLayerNorm, DalleBartModel
from bart_prior.model import PriorConfig
from bart_prior.prior import BartPrior
from bart_prior.tokenizer import tokenizer_from_bpe_files
from core.errors import ModelFolderError, UserError
from core.files import atomic_folder, atomic_update, read_json
from core.flax_msgpack import flatten, read_flax_msgpack, unflatten, write_flax_msgpack

SOURCES, TARGETS = ("dalle-mini", "min-dalle", "folder"), ("folder", "min-dalle", "dalle-mini")
VARIANTS = ("mini", "mega")  # min-dalle's file names: encoder_mini.pt, ... and encoder.pt, ...
CODEBOOK = 16384  # VQGAN f16-16384, the only codes min-dalle samples (logits[:, :2**14])
MIN_DALLE_START = 2 ** 14 - 1
DALLE_MINI_CONDITION_SCALE = 10.0
MIN_DALLE_IMAGE_TOKENS = 256  # min-dalle's IMAGE_TOKEN_COUNT: its decoder's position table has exactly this many rows
FLAX_FILE = "flax_model.msgpack"
# our module names -> the auto-names Flax gives the same modules (their order of creation in dalle-mini's layers)
_FLAX_NAMES = {"pre_self_attn_layer_norm": "LayerNorm_0", "self_attn": "FlaxBartAttention_0",
               "self_attn_layer_norm": "LayerNorm_1", "pre_encoder_attn_layer_norm": "LayerNorm_2",
               "encoder_attn": "FlaxBartAttention_1", "encoder_attn_layer_norm": "LayerNorm_3", "glu": "GLU_0",
               "ln0": "LayerNorm_0", "ln1": "LayerNorm_1", "fc0": "Dense_0", "fc1": "Dense_1", "fc2": "Dense_2"}
# dalle-mini config flags that change the forward pass, with the only values DalleBart implements (also the
# defaults of DalleBartConfig, so an absent key is fine)
_ARCH_FLAGS = {"use_bias": False, "ln_type": "layernorm", "ln_positions": "normformer", "use_glu": True,
               "use_head_scale": False, "use_cosine_attention": False, "use_swin_position_embeddings": False,
               "use_deepnet_scaling": False, "use_absolute_position_embeddings": True, "scale_embedding": False,
               "use_final_ln_encoder": True, "use_final_ln_decoder": True, "force_ln_scale": False,
               "tie_word_embeddings": False, "use_alibi": False, "sinkhorn_iters": 1, "activation_function": "gelu"}
# Locates one parameter of ours in a source: (our key, kind) -> (file, name in file, layer on a stacked axis or
# None, stored transposed)
Locator = Callable[[str, str], tuple[str, str, Optional[int], bool]]


def _kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "embedding" if isinstance(module, nn.Embedding) else "norm"


def _flax_locator(path: str, scanned: bool) -> Locator:
    def locate(key: str, kind: str) -> tuple[str, str, Optional[int], bool]:
        *mods, leaf = key.split(".")
        parts, layer, mods = (["lm_head"] if mods[0] == "lm_head" else ["model", mods[0]]), None, mods[1:]
        if mods and mods[0] == "layers":
            side, layer = "Encoder" if parts[1] == "encoder" else "Decoder", int(mods[1])
            parts += ["layers", f"FlaxBart{side}Layers" if scanned else f"FlaxBart{side}Layer_{layer}"]
            mods, layer = mods[2:], layer if scanned else None
        if leaf == "weight":
            leaf = {"linear": "kernel", "embedding": "embedding", "norm": "scale"}[kind]
        return path, "/".join(parts + [_FLAX_NAMES.get(m, m) for m in mods] + [leaf]), layer, kind == "linear"
    return locate


def _min_dalle_locator(encoder: str, decoder: str) -> Locator:
    def locate(key: str, kind: str) -> tuple[str, str, Optional[int], bool]:
        side, _, local = key.partition(".")
        if side == "lm_head":  # min-dalle keeps the head inside its decoder module
            return decoder, key, None, False
        return (encoder if side == "encoder" else decoder), local, None, False
    return locate


def _layout(model: nn.Module, locate: Locator):
    """{(file, name): (shape in file, [(our key, layer, transposed)])} and {(file, name)} of the scale-less norms'
    weights, which a file may carry as ones."""
    if not isinstance(model, DalleBartModel):
        raise ModelFolderError("only model.arch dallebart priors convert to DALL·E Mini's formats")
    modules = dict(model.named_modules())
    layout: dict[tuple[str, str], tuple[tuple[int, ...], list]] = {}
    for key, p in model.state_dict().items():
        file, name, layer, transposed = locate(key, _kind(modules[key.rpartition(".")[0]]))
        shape = tuple(p.shape[::-1]) if transposed else tuple(p.shape)
        layout.setdefault((file, name), (shape, []))[1].append((key, layer, transposed))
    layout = {k: (shape if uses[0][1] is None else (len(uses),) + shape, uses) for k, (shape, uses) in layout.items()}
    ones = {locate(f"{name}.weight", "norm")[:2] for name, m in modules.items() if isinstance(m, BiasOnlyLayerNorm)}
    return layout, ones


def _to_torch(value, transposed: bool = False) -> torch.Tensor:
    """A float32, C-ordered copy of a numpy array or tensor from a file (fp16/bf16 sources become fp32)."""
    if isinstance(value, torch.Tensor):
        return (value.T if transposed else value).float().contiguous()
    return torch.from_numpy(np.array(value.T if transposed else value, dtype=np.float32, order="C"))


def _gather(model: DalleBartModel, locate: Locator, files: dict[str, dict], basis: str) -> dict[str, torch.Tensor]:
    """Our state dict from the source tensors; a missing, extra or misshaped tensor is a one-line error."""
    layout, ones = _layout(model, locate)
    for file, tensors in files.items():
        for name, value in tensors.items():
            if (file, name) in ones:
                if not bool((_to_torch(value) == 1).all()):
                    raise ModelFolderError(f"{file}: tensor '{name}' is not all ones; DalleBart's norm there has no "
                                           "scale, so the checkpoint is not the published architecture")
            elif (file, name) not in layout:
                raise ModelFolderError(f"{file}: unexpected tensor '{name}' (shape {tuple(getattr(value, 'shape', ()))}"
                                       "), not part of DalleBart")
    state = {}
    for (file, name), (shape, uses) in layout.items():
        if name not in files[file]:
            raise ModelFolderError(f"{file}: missing tensor '{name}' (expected shape {shape})")
        value = files[file][name]
        if tuple(getattr(value, "shape", ())) != shape:
            raise ModelFolderError(f"{file}: tensor '{name}' has shape {tuple(getattr(value, 'shape', ()))}, but "
                                   f"{basis} make it {shape}")
        for key, layer, transposed in uses:
            state[key] = _to_torch(value if layer is None else value[layer], transposed)
    return state


def _build(sizes: dict, tokenizer, locate: Locator, files: dict[str, dict], basis: str) -> BartPrior:
    length = int(sizes.pop("image_length"))
    side = math.isqrt(length)
    # condition_scale: dalle-mini's demo default, so that generate.py on a converted folder guides as it does
    cfg = PriorConfig(arch="dallebart", grid=[side, side] if side * side == length else [1, length],
                      text_pad_token_id=tokenizer.pad_token_id, condition_scale=DALLE_MINI_CONDITION_SCALE, **sizes)
    cfg.check()
    with torch.device("meta"):  # no random init of billions of parameters that are overwritten next
        model = DalleBartModel(cfg)
    model.load_state_dict(_gather(model, locate, files, basis), strict=True, assign=True)
    return BartPrior(cfg, tokenizer, model=model.eval())


def _sizes(found: dict, config: dict, opts: dict, path: str) -> dict:
    """PriorConfig sizes: config.json's where it states them, else the tensors'; then the command-line options."""
    out = dict(found)
    for ours, theirs in (("d_model", "d_model"), ("encoder_layers", "encoder_layers"), ("ffn_dim", "encoder_ffn_dim"),
                         ("decoder_layers", "decoder_layers"), ("text_vocab_size", "encoder_vocab_size"),
                         ("image_vocab_size", "image_vocab_size"), ("max_text_length", "max_text_length"),
                         ("image_length", "image_length"), ("attention_heads", "encoder_attention_heads"),
                         ("start_token", "decoder_start_token_id")):
        if config.get(theirs) is not None:
            if not isinstance(config[theirs], int):
                raise ModelFolderError(f"{path}: {theirs} is {config[theirs]!r}, expected an integer")
            out[ours] = config[theirs]
    for a, b in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if config.get(b) is not None and config.get(a, config[b]) != config[b]:
            raise ModelFolderError(f"{path}: {a} {config.get(a)} differs from {b} {config[b]}; DalleBart uses one "
                                   "value for both sides")
    heads = opts.get("heads")
    if heads is not None and "attention_heads" in out and heads != out["attention_heads"]:
        raise ModelFolderError(f"{path}: encoder_attention_heads is {out['attention_heads']}, --heads says {heads}")
    out["attention_heads"] = out.get("attention_heads") or heads or max(1, out["d_model"] // 64)
    out["codebook_size"] = opts.get("codebook_size") or min(CODEBOOK, out["image_vocab_size"])
    out["start_token"] = opts["start_token"] if opts.get("start_token") is not None else out["start_token"]
    return out


def _found(files: dict[str, dict], locate: Locator) -> dict:
    """Sizes read off the tensors, for what config.json does not state."""
    def shape(key: str) -> tuple:
        file, name, layer, transposed = locate(key, "linear" if ".fc" in key else "embedding")
        if name not in files[file]:
            raise ModelFolderError(f"{file}: missing tensor '{name}'")
        s = tuple(files[file][name].shape)[0 if layer is None else 1:]
        return s[::-1] if transposed else s

    def layers(side: str) -> int:
        file, name, layer, _ = locate(f"{side}.layers.0.glu.fc0.weight", "linear")
        if layer is not None:  # stacked layers: the leading axis
            return files[file][name].shape[0] if name in files[file] else 0
        def prefix(n: int) -> str:  # the names of layer n start with this
            name = locate(f"{side}.layers.{n}.glu.fc0.weight", "linear")[1]
            return name[: name.lower().rindex("glu")]

        n = 0  # the first gap ends the count; layers past it are then reported as unexpected tensors
        while any(k.startswith(prefix(n)) for k in files[file]):
            n += 1
        return n

    (text_vocab, d), (positions, _) = shape("encoder.embed_tokens.weight"), shape("encoder.embed_positions.weight")
    return dict(d_model=d, text_vocab_size=text_vocab, max_text_length=positions,
                ffn_dim=shape("encoder.layers.0.glu.fc0.weight")[0], encoder_layers=layers("encoder"),
                image_vocab_size=shape("decoder.embed_tokens.weight")[0] - 1, decoder_layers=layers("decoder"),
                image_length=shape("decoder.embed_positions.weight")[0])


def _tokenizer(folder: str, vocab: str, merges: str, max_length: int):
    for name in (vocab, merges):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"{folder}: no {name}; copy the checkpoint's tokenizer files beside its weights")
    return tokenizer_from_bpe_files(os.path.join(folder, vocab), os.path.join(folder, merges), max_length)


def read_dalle_mini(folder: str, heads: Optional[int] = None, codebook_size: Optional[int] = None,
                    start_token: Optional[int] = None) -> BartPrior:
    """A dalle-mini checkpoint folder -> BartPrior (in memory)."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: no such folder")
    weights, cfg_path = os.path.join(folder, FLAX_FILE), os.path.join(folder, "config.json")
    if not os.path.isfile(weights):
        raise ModelFolderError(f"{folder} is not a dalle-mini checkpoint (no {FLAX_FILE})")
    config = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    if config.get("model_type", "dallebart") != "dallebart":
        raise ModelFolderError(f"{cfg_path}: model_type is {config['model_type']!r}, not dallebart")
    for key, value in _ARCH_FLAGS.items():
        if key in config and config[key] != value:
            raise ModelFolderError(f"{cfg_path}: {key} is {config[key]!r}; only {value!r} (the published DALL·E "
                                   "Mini / Mega architecture) converts")
    tree = read_flax_msgpack(weights)
    tree = tree["params"] if set(tree) == {"params"} else tree  # a tree saved with its collection name
    files = {weights: dict(flatten(tree))}
    scanned = any("/FlaxBartEncoderLayers/" in name for name in files[weights])
    locate = _flax_locator(weights, scanned)
    found = _found(files, locate)
    found.update(normalize_text=bool(config.get("normalize_text", False)), start_token=found["image_vocab_size"])
    sizes = _sizes(found, config, dict(heads=heads, codebook_size=codebook_size, start_token=start_token), cfg_path)
    tokenizer = _tokenizer(folder, "vocab.json", "merges.txt", sizes["max_text_length"])
    basis = "config.json and the other tensors" if config else "the other tensors"
    return _build(sizes, tokenizer, locate, files, basis)


def _torch_state(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors... for damaged files
        raise ModelFolderError(f"{path}: not a readable PyTorch state dict ({str(exc).splitlines()[0][:160]}); it "
                               "is damaged or truncated") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFolderError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def read_min_dalle(folder: str, variant: Optional[str] = None, heads: Optional[int] = None,
                   codebook_size: Optional[int] = None, start_token: Optional[int] = None) -> BartPrior:
    """min-dalle's files in ``folder`` (``variant`` mini or mega; None: whichever set is there) -> BartPrior."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: no such folder")
    if variant is None:
        present = [v for v in VARIANTS if os.path.isfile(os.path.join(folder, f"encoder{_suffix(v)}.pt"))]
        if len(present) != 1:
            raise ModelFolderError(f"{folder}: " + ("holds both mini and mega files; pass --variant" if present else
                                                    "not a min-dalle folder (no encoder.pt or encoder_mini.pt)"))
        variant = present[0]
    suffix = _suffix(variant)
    names = [f"encoder{suffix}.pt", f"decoder{suffix}.pt"]
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"{folder} is not a min-dalle {variant} folder (no {name})")
    enc, dec = (os.path.join(folder, n) for n in names)
    files = {enc: _torch_state(enc), dec: _torch_state(dec)}
    locate = _min_dalle_locator(enc, dec)
    found = _found(files, locate)
    found.update(normalize_text=True, start_token=MIN_DALLE_START)
    sizes = _sizes(found, {}, dict(heads=heads, codebook_size=codebook_size, start_token=start_token), folder)
    tokenizer = _tokenizer(folder, f"vocab{suffix}.json", f"merges{suffix}.txt", sizes["max_text_length"])
    return _build(sizes, tokenizer, locate, files, "the other tensors")


def _suffix(variant: str) -> str:
    if variant not in VARIANTS:
        raise ModelFolderError(f"min-dalle's files come as --variant mini or mega, not {variant!r}")
    return "_mini" if variant == "mini" else ""


def _bpe_files(prior: BartPrior) -> tuple[str, str]:
    """(vocab.json text, merges.txt text) of the prior's tokenizer."""
    import tempfile

    from tokenizers import models

    model = getattr(prior.tokenizer, "backend_tokenizer", None)
    if model is None or not isinstance(model.model, models.BPE):
        raise ModelFolderError("the prior's tokenizer is not a byte-level BPE; min-dalle and dalle-mini need one")
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = model.model.save(tmp)
        return open(vocab, encoding="utf-8").read(), open(merges, encoding="utf-8").read()


def write_min_dalle(prior: BartPrior, out: str, variant: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """min-dalle's four files in ``out`` (other files there are kept); returns notes on what min-dalle will do
    differently from this prior."""
    cfg, suffix = prior.config, _suffix(variant)
    if cfg.seq_len != MIN_DALLE_IMAGE_TOKENS or cfg.codebook_size != CODEBOOK:
        raise ModelFolderError(f"min-dalle decodes {MIN_DALLE_IMAGE_TOKENS} tokens from {CODEBOOK} codes; this "
                               f"prior has {cfg.seq_len} tokens and {cfg.codebook_size} codes")
    enc, dec = f"encoder{suffix}.pt", f"decoder{suffix}.pt"
    layout, ones = _layout(prior.model, _min_dalle_locator(enc, dec))
    state = {k: v.detach() for k, v in prior.model.state_dict().items()}
    files: dict[str, dict[str, torch.Tensor]] = {enc: {}, dec: {}}
    for (file, name), (_, [(key, _, _)]) in layout.items():
        files[file][name] = state[key].to(dtype).contiguous().clone()
    for file, name in ones:  # min-dalle's modules have a weight there; ones keep a strict load_state_dict working
        files[file][name] = torch.ones_like(files[file][name[: -len("weight")] + "bias"])
    vocab, merges = _bpe_files(prior)
    payloads = {enc: files[enc], dec: files[dec], f"vocab{suffix}.json": vocab, f"merges{suffix}.txt": merges}
    with atomic_update(out, list(payloads)) as tmp:  # the four files change together: one version, never a mix
        for name, payload in payloads.items():
            if isinstance(payload, str):
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                    fh.write(payload)
            else:
                torch.save(payload, os.path.join(tmp, name))
    notes = []
    if cfg.start_token_id != MIN_DALLE_START:
        notes.append(f"min-dalle starts decoding from {MIN_DALLE_START}, this prior from {cfg.start_token_id}: "
                     "their images differ")
    if (cfg.text_positions or cfg.max_text_length) != 64:
        notes.append("min-dalle pads captions to 64 tokens; this prior's encoder has another length")
    return notes


def write_dalle_mini(prior: BartPrior, out: str, dtype: torch.dtype = torch.float32) -> None:
    """A dalle-mini folder (config.json, flax_model.msgpack with scanned layers, tokenizer files), atomically."""
    cfg = prior.config
    layout, _ = _layout(prior.model, _flax_locator(FLAX_FILE, scanned=True))
    state = {k: v.detach().to(dtype) for k, v in prior.model.state_dict().items()}
    tree = {}
    for (_, name), (_, uses) in layout.items():
        parts = [(state[key].T if transposed else state[key]).numpy() for key, _, transposed in uses]
        tree[name] = np.ascontiguousarray(np.stack(parts) if uses[0][1] is not None else parts[0])
    heads, ffn = cfg.attention_heads, cfg.ffn_dim
    config = dict(_ARCH_FLAGS, model_type="dallebart", normalize_text=cfg.normalize_text, d_model=cfg.d_model,
                  encoder_vocab_size=cfg.text_vocab_size, image_vocab_size=cfg.decoder_vocab_size - 1,
                  image_length=cfg.seq_len, max_text_length=cfg.text_positions or cfg.max_text_length,
                  encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers, encoder_ffn_dim=ffn,
                  decoder_ffn_dim=ffn, encoder_attention_heads=heads, decoder_attention_heads=heads,
                  decoder_start_token_id=cfg.start_token_id, use_scan=True, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0)
    vocab, merges = _bpe_files(prior)
    with atomic_folder(out) as tmp:
        write_flax_msgpack(unflatten(tree), os.path.join(tmp, FLAX_FILE))
        prior.tokenizer.save_pretrained(tmp)
        for name, text in (("config.json", json.dumps(config, indent=2)), ("vocab.json", vocab),
                           ("merges.txt", merges)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)


def read_prior(kind: str, path: str, variant: Optional[str] = None, **opts: Optional[int]) -> BartPrior:
    """Any source (``dalle-mini``, ``min-dalle``, ``folder``) -> BartPrior; ``opts``: heads, codebook_size,
    start_token (not for folders, whose config states them)."""
    if kind == "dalle-mini":
        return read_dalle_mini(path, **opts)
    if kind == "min-dalle":
        return read_min_dalle(path, variant, **opts)
    if kind == "folder":
        if any(v is not None for v in opts.values()):
            raise ModelFolderError("--heads, --codebook-size and --start-token apply to dalle-mini and min-dalle "
                                   "sources; a BartPrior folder's config.json states them")
        return BartPrior.from_pretrained(path)
    raise ModelFolderError(f"unknown source {kind!r}; choose one of {', '.join(SOURCES)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bart_prior.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", nargs=2, metavar=("KIND", "DIR"), required=True,
                    help=f"where the prior is: {', '.join(SOURCES)}")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--to", nargs=2, metavar=("KIND", "OUT"), help=f"write it as {', '.join(TARGETS)}")
    out.add_argument("--out", help="write a BartPrior folder (same as --to folder OUT)")
    ap.add_argument("--variant", help="min-dalle file names: mini (encoder_mini.pt, ...) or mega (encoder.pt, ...)")
    ap.add_argument("--heads", type=int, help="attention heads where no config.json says (default d_model / 64)")
    ap.add_argument("--codebook-size", type=int,
                    help=f"VQGAN codes (default {CODEBOOK}, or the image vocabulary if smaller)")
    ap.add_argument("--start-token", type=int, help="the decoder's first input id (default: see above)")
    ap.add_argument("--dtype", default="float32", help="float32 or float16, for --to min-dalle / dalle-mini")
    args = ap.parse_args(argv)
    target, dest = args.to if args.to else ("folder", args.out)
    try:
        if target not in TARGETS:
            raise ModelFolderError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(args.dtype)
        if dtype is None or (dtype != torch.float32 and target == "folder"):
            raise ModelFolderError(f"--dtype {args.dtype}: choose float32, or float16 with --to min-dalle/dalle-mini")
        if target == "min-dalle":
            _suffix(args.variant)  # a bad variant fails before the slow read
        prior = read_prior(args.source[0], args.source[1], args.variant if args.source[0] == "min-dalle" else None,
                           heads=args.heads, codebook_size=args.codebook_size, start_token=args.start_token)
        notes: list[str] = []
        if target == "folder":
            prior.save_pretrained(dest)
        elif target == "min-dalle":
            notes = write_min_dalle(prior, dest, args.variant, dtype)
        else:
            write_dalle_mini(prior, dest, dtype)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    c = prior.config
    print(f"wrote {dest} ({target}): DalleBart d_model {c.d_model}, {c.encoder_layers}+{c.decoder_layers} layers, "
          f"{c.attention_heads} heads, GLU {c.ffn_dim}, text vocab {c.text_vocab_size}, image vocab "
          f"{c.decoder_vocab_size - 1}, {c.codebook_size} codes, start token {c.start_token_id}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

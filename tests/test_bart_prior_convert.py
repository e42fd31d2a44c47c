"""The DALL·E Mini / Mega prior converter (bart_prior/convert.py) against min-dalle 0.4.11's own torch modules.

Small random DalleBarts are built with min-dalle's DalleBartEncoder / DalleBartDecoder (biases of the scale-less
norms random, their weights left at one), saved as min-dalle's files and as dalle-mini's Flax folders (scanned,
unscanned, fp16; the tree written here from CHECKPOINTS.md, not by the converter), converted, and compared:
teacher-forced logits, greedy guided decoding (min-dalle's own sample_tokens loop, replicated from its
MinDalle.generate_raw_image_stream, which cannot be imported: min_dalle.min_dalle changes torch's global state),
tokenization, and the export back to both formats.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bart_prior import BartPrior
from bart_prior.convert import main
from bench._min_dalle import min_dalle_sample
from core.flax_msgpack import flatten, read_flax_msgpack, unflatten, write_flax_msgpack

from _bart_prior_helpers import one_thread  # noqa: F401 (autouse)
from _min_dalle_helpers import (CODES, D, GLU, HEADS, IMAGE_LEN, LAYERS, PROMPTS, SCALELESS, TEXT_LEN,
                                DalleBartDecoder, DalleBartEncoder, TextTokenizer, md_state,
                                min_dalle_logits, min_dalle_tokenizer, padded, reference, write_bpe)


# min-dalle's module names -> the names of the same modules in dalle-mini's Flax tree (CHECKPOINTS.md)
ATTN = {"self_attn": "FlaxBartAttention_0", "encoder_attn": "FlaxBartAttention_1"}
NORMS = {"pre_self_attn_layer_norm": "LayerNorm_0", "self_attn_layer_norm": "LayerNorm_1",
         "pre_encoder_attn_layer_norm": "LayerNorm_2", "encoder_attn_layer_norm": "LayerNorm_3",
         "glu.ln0": "GLU_0/LayerNorm_0", "glu.ln1": "GLU_0/LayerNorm_1"}


def flax_tree(enc, dec, scanned: bool, dtype=np.float32) -> dict:
    items = {"lm_head/kernel": dec.lm_head.weight.T}
    for side, module in (("encoder", enc), ("decoder", dec)):
        root = f"model/{side}"
        items[f"{root}/embed_tokens/embedding"] = module.embed_tokens.weight
        items[f"{root}/embed_positions/embedding"] = module.embed_positions.weight
        items[f"{root}/layernorm_embedding/scale"] = module.layernorm_embedding.weight
        items[f"{root}/layernorm_embedding/bias"] = module.layernorm_embedding.bias
        items[f"{root}/final_ln/bias"] = module.final_ln.bias
        per_layer: dict[str, list] = {}
        for layer in module.layers:
            sd = layer.state_dict()
            for ours, theirs in NORMS.items():
                if f"{ours}.bias" in sd:
                    per_layer.setdefault(f"{theirs}/bias", []).append(sd[f"{ours}.bias"])
                    if not ours.endswith(SCALELESS):
                        per_layer.setdefault(f"{theirs}/scale", []).append(sd[f"{ours}.weight"])
            for ours, theirs in ATTN.items():
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj") if f"{ours}.q_proj.weight" in sd else ():
                    per_layer.setdefault(f"{theirs}/{proj}/kernel", []).append(sd[f"{ours}.{proj}.weight"].T)
            for i in range(3):
                per_layer.setdefault(f"GLU_0/Dense_{i}/kernel", []).append(sd[f"glu.fc{i}.weight"].T)
        cls = f"FlaxBart{side.capitalize()}Layer"
        for name, tensors in per_layer.items():
            if scanned:
                items[f"{root}/layers/{cls}s/{name}"] = torch.stack(tensors)
            else:
                items.update({f"{root}/layers/{cls}_{i}/{name}": t for i, t in enumerate(tensors)})
    return {k: v.detach().numpy().astype(dtype) for k, v in items.items()}


def write_dalle_mini(folder: str, tok_dir: str, enc, dec, scanned: bool, dtype) -> str:
    os.makedirs(folder)
    write_flax_msgpack(unflatten(flax_tree(enc, dec, scanned, dtype)), os.path.join(folder, "flax_model.msgpack"))
    config = dict(model_type="dallebart", normalize_text=True, encoder_vocab_size=enc.text_vocab_count,
                  image_vocab_size=dec.image_vocab_count, image_length=IMAGE_LEN, max_text_length=TEXT_LEN, d_model=D,
                  encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=GLU, decoder_ffn_dim=GLU,
                  encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, use_scan=scanned,
                  decoder_start_token_id=dec.image_vocab_count, use_bias=False, ln_type="layernorm",
                  ln_positions="normformer", use_glu=True, activation_function="gelu", tie_word_embeddings=False)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tok_dir, name), folder)
    # the class AutoTokenizer cannot resolve without dalle-mini installed: the converter must not need it
    json.dump({"tokenizer_class": "DalleBartTokenizer"}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return folder


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Reference models, their files in every format, and the converted priors."""
    root = tmp_path_factory.mktemp("convert")
    tok_dir = str(root / "tok")
    write_bpe(tok_dir)
    text_vocab = len(json.load(open(os.path.join(tok_dir, "vocab.json")))) - 1  # <mask> past the embedding, as mini
    refs = {"mini": reference(text_vocab, CODES, seed=1), "mega": reference(text_vocab, 16415, seed=2)}
    sources = {}
    for variant, (enc, dec) in refs.items():
        suffix = "_mini" if variant == "mini" else ""
        folder = str(root / f"md-{variant}")
        write_bpe(folder, f"vocab{suffix}.json", f"merges{suffix}.txt")
        # the mega files carry the scale-less norms' weights as ones (what min-dalle's own state_dict holds)
        torch.save(md_state(enc, keep_ones=variant == "mega"), os.path.join(folder, f"encoder{suffix}.pt"))
        torch.save(md_state(dec, keep_ones=variant == "mega"), os.path.join(folder, f"decoder{suffix}.pt"))
        sources[f"min-dalle-{variant}"] = (["--from", "min-dalle", folder, "--heads", str(HEADS)], variant)
    flax = (("scanned", "mini", True, np.float32), ("unscanned", "mega", False, np.float32),
            ("fp16", "mini", True, np.float16))
    for name, variant, scanned, dtype in flax:
        folder = write_dalle_mini(str(root / f"dm-{name}"), tok_dir, *refs[variant], scanned, dtype)
        sources[f"dalle-mini-{name}"] = (["--from", "dalle-mini", folder], variant)
    priors, folders = {}, {}
    for name, (args, variant) in sources.items():
        folders[name] = str(root / f"out-{name}")
        assert main(args + ["--out", folders[name]]) == 0, name
        priors[name] = (BartPrior.from_pretrained(folders[name]), refs[variant])
    return dict(root=root, tok_dir=tok_dir, refs=refs, priors=priors, folders=folders, sources=sources,
                text_vocab=text_vocab)


@pytest.mark.parametrize("source", ["min-dalle-mini", "min-dalle-mega", "dalle-mini-scanned", "dalle-mini-unscanned"])
def test_teacher_forced_logits_match_min_dalle(world, source):
    prior, (enc, dec) = world["priors"][source]
    assert prior.config.start_token_id == (16383 if source.startswith("min-dalle") else dec.image_vocab_count)
    assert prior.config.codebook_size == CODES and prior.config.decoder_vocab_size == dec.image_vocab_count + 1
    captions = [PROMPTS[i] for i in (0, 5, 4, 1, 15, 17)]  # 1 to 12 words: different paddings
    text = padded(min_dalle_tokenizer(world["tok_dir"]), captions)
    ids, mask = prior.encode_prompts(captions)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == [row[row.ne(1)].tolist() for row in text]
    codes = torch.randint(0, CODES, (3, IMAGE_LEN), generator=torch.Generator().manual_seed(0))
    inputs = prior.model.decoder_inputs(codes)
    expected = min_dalle_logits(enc, dec, text, inputs)[..., :CODES]
    with torch.no_grad():
        ours = prior.model(ids, mask, inputs.repeat(2, 1))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-5


def min_dalle_greedy(enc, dec, tokenizer: TextTokenizer, prompt: str, start: int, scale: float) -> torch.Tensor:
    """min-dalle's own sampling loop for one image, top_k 1, temperature 1."""
    return min_dalle_sample(enc, dec, tokenizer.tokenize(prompt), 1, scale, top_k=1, temperature=1.0, start=start)[0]


@pytest.mark.parametrize("source", ["min-dalle-mini", "min-dalle-mega", "dalle-mini-scanned"])
def test_greedy_guided_decoding_matches_min_dalle(world, source):
    prior, (enc, dec) = world["priors"][source]
    tokenizer = min_dalle_tokenizer(world["tok_dir"])
    prompts = [PROMPTS[1], PROMPTS[9]]
    ours = prior.generate(prompts, top_k=1, condition_scale=3.0, temperature=1.0, precision="fp32")
    for prompt, codes in zip(prompts, ours[:, 0]):
        expected = min_dalle_greedy(enc, dec, tokenizer, prompt, prior.config.start_token_id, 3.0)
        assert codes.tolist() == expected.tolist(), prompt
    assert len(set(ours[0, 0].tolist())) > 10  # not a degenerate model that repeats one code


def test_sampling_never_reaches_ids_past_the_codebook(world):
    prior, (_, dec) = world["priors"]["min-dalle-mega"]
    head = dec.lm_head.weight.detach()
    assert head[CODES:].norm(dim=1).min() > head[:CODES].norm(dim=1).max()  # those ids would win if sampled
    codes = prior.generate(PROMPTS[:3], num_candidates=2, condition_scale=3.0, temperature=1.0, seed=1)
    assert 0 <= int(codes.min()) and int(codes.max()) < CODES


def test_fp16_source_converts_to_its_rounded_values(world):
    half, full = (world["priors"][f"dalle-mini-{n}"][0].model.state_dict() for n in ("fp16", "scanned"))
    assert all(half[k].dtype == torch.float32 and torch.equal(half[k], v.half().float()) for k, v in full.items())


@pytest.mark.parametrize("source", ["min-dalle-mini", "dalle-mini-unscanned"])
def test_export_to_min_dalle_loads_strictly_and_matches(world, source, capsys):
    prior, (enc, dec) = world["priors"][source]
    variant = world["sources"][source][1]
    suffix = "_mini" if variant == "mini" else ""
    out = str(world["root"] / f"to-md-{source}")
    code, err = run(["--from", "folder", world["folders"][source], "--to", "min-dalle", out, "--variant", variant],
                    capsys)
    assert code == 0, err
    assert ("starts decoding from 16383" in err) == (not source.startswith("min-dalle"))
    enc2 = DalleBartEncoder(LAYERS, D, HEADS, world["text_vocab"], TEXT_LEN, GLU, "cpu").eval()
    dec2 = DalleBartDecoder(dec.image_vocab_count, D, HEADS, GLU, LAYERS, "cpu").eval()
    enc2.load_state_dict(torch.load(os.path.join(out, f"encoder{suffix}.pt"), weights_only=True), strict=True)
    dec2.load_state_dict(torch.load(os.path.join(out, f"decoder{suffix}.pt"), weights_only=True), strict=True)
    for a, b in ((enc, enc2), (dec, dec2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    tokenizer = min_dalle_tokenizer(out, suffix)
    assert all(tokenizer.tokenize(p) == min_dalle_tokenizer(world["tok_dir"]).tokenize(p) for p in PROMPTS)
    text = padded(tokenizer, PROMPTS[:4])
    tokens = torch.randint(0, CODES, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(min_dalle_logits(enc, dec, text, tokens), min_dalle_logits(enc2, dec2, text, tokens))


def test_export_to_dalle_mini_round_trips(world, capsys):
    out = str(world["root"] / "to-dm")
    code, err = run(["--from", "folder", world["folders"]["min-dalle-mini"], "--to", "dalle-mini", out], capsys)
    assert code == 0, err
    enc, dec = world["refs"]["mini"]
    written = dict(flatten(read_flax_msgpack(os.path.join(out, "flax_model.msgpack"))))
    expected = flax_tree(enc, dec, True)
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == np.float32 and np.array_equal(written[k], expected[k]) for k in expected)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["decoder_start_token_id"] == 16383 and config["use_scan"] and config["normalize_text"]
    back = str(world["root"] / "from-dm")
    assert main(["--from", "dalle-mini", out, "--out", back]) == 0
    a = BartPrior.from_pretrained(back)
    b = world["priors"]["min-dalle-mini"][0]
    assert a.config == b.config
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert main(["--from", "folder", back, "--to", "dalle-mini", out, "--dtype", "float16"]) == 0
    assert read_flax_msgpack(os.path.join(out, "flax_model.msgpack"))["lm_head"]["kernel"].dtype == np.float16


@pytest.mark.parametrize("source", ["min-dalle-mini", "dalle-mini-scanned"])
def test_tokenization_matches_min_dalle(world, source):
    prior = world["priors"][source][0]
    assert prior.config.normalize_text and len(prior.tokenizer) == world["text_vocab"] + 1
    tokenizer = min_dalle_tokenizer(world["tok_dir"])
    ids, mask = prior.encode_prompts(PROMPTS)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == [tokenizer.tokenize(p) for p in PROMPTS]
    assert prior.empty_prompt_ids().tolist() == [0, 2]  # the unconditional row: the unnormalised empty caption
    assert any(len(tokenizer.get_byte_pair_encoding(w, False)) > 1 for w in " ".join(PROMPTS).split())
    # the normaliser's leading space is what gives the first word its 'Ġ' form
    assert prior.tokenizer("zebra")["input_ids"] != tokenizer.tokenize("zebra")


def test_overrides_and_usage_errors(world, capsys):
    md = world["sources"]["min-dalle-mini"][0][2]
    out = str(world["root"] / "overridden")
    code, err = run(["--from", "min-dalle", md, "--heads", "8", "--start-token", "16384", "--codebook-size", "8192",
                     "--out", out], capsys)
    assert code == 0, err
    cfg = BartPrior.from_pretrained(out).config
    assert (cfg.attention_heads, cfg.start_token_id, cfg.codebook_size, cfg.image_vocab_size) == (8, 16384, 8192, CODES)
    folder = world["folders"]["min-dalle-mini"]
    for args, words in ((["--from", "folder", folder, "--heads", "4", "--out", out], "--heads"),
                        (["--from", "folder", folder, "--to", "min-dalle", out], "--variant"),
                        (["--from", "flax", folder, "--out", out], "'flax'"),
                        (["--from", "folder", folder, "--to", "onnx", out], "'onnx'"),
                        (["--from", "folder", folder, "--out", out + "2", "--dtype", "float16"], "float16")):
        code, err = run(args, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
    assert not os.path.exists(out + "2")


def _truncate(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _edit_pt(path: str, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _edit_config(path: str, **changes) -> None:
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump({**config, **changes}, open(os.path.join(path, "config.json"), "w"))


def _edit_flax(folder: str, name: str, edit) -> None:
    items = dict(flatten(read_flax_msgpack(os.path.join(folder, "flax_model.msgpack"))))
    items[name] = edit(items[name])
    write_flax_msgpack(unflatten(items), os.path.join(folder, "flax_model.msgpack"))


def _add_fc3(state: dict) -> None:
    state["layers.0.glu.fc3.weight"] = state["layers.0.glu.fc2.weight"]


QKV = "model/encoder/layers/FlaxBartEncoderLayers/FlaxBartAttention_0/q_proj/kernel"
BAD = {  # name: (source copied, how it is damaged, extra arguments, words the message must hold)
    "unknown variant": ("min-dalle-mini", None, ["--variant", "maxi"], ["maxi"]),
    "empty folder": (None, None, ["dalle-mini"], ["not a dalle-mini checkpoint", "flax_model.msgpack"]),
    "empty min-dalle folder": (None, None, ["min-dalle"], ["not a min-dalle folder"]),
    "truncated msgpack": ("dalle-mini-scanned", lambda d: _truncate(os.path.join(d, "flax_model.msgpack")), [],
                          ["flax_model.msgpack", "truncated"]),
    "truncated pt": ("min-dalle-mini", lambda d: _truncate(os.path.join(d, "decoder_mini.pt")), [],
                     ["decoder_mini.pt", "truncated"]),
    "missing tensor": ("min-dalle-mini", lambda d: _edit_pt(os.path.join(d, "decoder_mini.pt"),
                                                            lambda s: s.pop("layers.1.glu.fc2.weight")), [],
                       ["decoder_mini.pt", "missing tensor 'layers.1.glu.fc2.weight'"]),
    "extra tensor": ("min-dalle-mega", lambda d: _edit_pt(os.path.join(d, "encoder.pt"), _add_fc3), [],
                     ["encoder.pt", "unexpected tensor 'layers.0.glu.fc3.weight'"]),
    "scale-less weight not ones": ("min-dalle-mega", lambda d: _edit_pt(os.path.join(d, "encoder.pt"),
                                                                        lambda s: s["final_ln.weight"].mul_(2)), [],
                                   ["encoder.pt", "final_ln.weight", "not all ones"]),
    "misshaped tensor": ("dalle-mini-scanned", lambda d: _edit_flax(d, QKV, lambda a: a[:, :, :-1]), [],
                         ["flax_model.msgpack", QKV, "(2, 64, 63)"]),
    "config contradicts tensors": ("dalle-mini-scanned", lambda d: _edit_config(d, encoder_layers=3), [],
                                   ["flax_model.msgpack", "has shape (2, 64)", "make it (3, 64)", "config.json"]),
    "config d_model": ("dalle-mini-unscanned", lambda d: _edit_config(d, d_model=128), [],
                       ["flax_model.msgpack", "embed_tokens/embedding"]),
    "unsupported architecture": ("dalle-mini-scanned", lambda d: _edit_config(d, ln_positions="swinv2"), [],
                                 ["config.json", "ln_positions"]),
    "heads do not divide": ("min-dalle-mini", None, ["--heads", "5"], ["attention_heads 5"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(world, case, capsys):
    source, damage, extra, words = BAD[case]
    folder = str(world["root"] / f"bad-{case.replace(' ', '-')}")
    if source is None:
        os.makedirs(folder)
        args = ["--from", extra[0], folder]
    else:
        shutil.copytree(world["sources"][source][0][2], folder)
        if damage:
            damage(folder)
        args = world["sources"][source][0][:2] + [folder] + world["sources"][source][0][3:] + extra
    out = str(world["root"] / f"bad-out-{case.replace(' ', '-')}")
    code, err = run(args + ["--out", out], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not os.path.exists(out) and not [p for p in os.listdir(world["root"]) if p.startswith(".bad-out")]


def test_cli_exit_code(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "bart_prior.convert", "--from", "min-dalle", str(tmp_path),
                          "--variant", "mega", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no encoder.pt" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()

"""Fine-tuning a published-format prior: a tiny DalleBart written as min-dalle's files is converted, fine-tuned through
the shipped configs/bart_prior/dalle-mini-finetune.yaml under 2-process FSDP2 (gloo, CPU), and its consolidated
export converts back to min-dalle's files, which min-dalle's own classes load strictly with logits equal to ours."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from _bart_prior_helpers import write_code_shards
from _launch_helpers import REPO, env, logged
from _min_dalle_helpers import (CODES, D, GLU, HEADS, LAYERS, TEXT_LEN, DalleBartDecoder, DalleBartEncoder,
                                min_dalle_logits, min_dalle_tokenizer, padded, reference, write_bpe)

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def test_converted_prior_finetunes_under_fsdp2_and_goes_back_to_min_dalle(tmp_path):
    from bart_prior import BartPrior
    from bart_prior.convert import main as convert

    source = str(tmp_path / "min-dalle")
    write_bpe(source, "vocab_mini.json", "merges_mini.txt")
    text_vocab = len(json.load(open(os.path.join(source, "vocab_mini.json")))) - 1  # <mask> past the embedding
    enc, dec = reference(text_vocab, CODES, seed=3)
    torch.save(enc.state_dict(), os.path.join(source, "encoder_mini.pt"))
    torch.save(dec.state_dict(), os.path.join(source, "decoder_mini.pt"))
    converted = str(tmp_path / "converted")
    assert convert(["--from", "min-dalle", source, "--variant", "mini", "--heads", str(HEADS), "--out", converted]) == 0

    train = write_code_shards(str(tmp_path / "codes" / "train"), 96, grid=(16, 16), codebook_size=CODES)
    val = write_code_shards(str(tmp_path / "codes" / "val"), 16, grid=(16, 16), codebook_size=CODES, seed=1)
    tiny = [f"model.d_model={D}", f"model.encoder_layers={LAYERS}", f"model.decoder_layers={LAYERS}",
            f"model.attention_heads={HEADS}", f"model.ffn_dim={GLU}", f"model.text_vocab_size={text_vocab}",
            "model.start_token=16383"]  # the min-dalle-sourced folder's start token
    cpu = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.progress_bar=false",
           "trainer.max_steps=16", "trainer.val_check_interval=16", "trainer.limit_val_batches=1",
           "trainer.checkpoint_every_n_steps=16", "trainer.log_every_n_steps=1", "data.batch_size=4",
           "data.num_workers=0", "data.shuffle_buffer=16", "optim.lr=2e-3", "optim.warmup_steps=2"]
    cmd = [sys.executable, "train.py", "bart_prior", "--config", "configs/bart_prior/dalle-mini-finetune.yaml",
           f"runs_dir={tmp_path}", "name=ft", f"init_from={converted}", f"data.train={train}", f"data.val={val}",
           *tiny, *cpu]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    losses = [v for _, v in logged(str(tmp_path / "ft"), "train/loss")]
    assert len(losses) >= 12 and sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses  # it learns

    tuned = BartPrior.from_pretrained(str(tmp_path / "ft" / "export"))
    start = BartPrior.from_pretrained(converted)
    assert tuned.config.arch == "dallebart" and tuned.config.start_token_id == 16383
    assert not torch.equal(tuned.model.lm_head.weight, start.model.lm_head.weight)  # the weights did move
    back = str(tmp_path / "back")
    assert convert(["--from", "folder", str(tmp_path / "ft" / "export"), "--to", "min-dalle", back,
                    "--variant", "mini"]) == 0
    enc2 = DalleBartEncoder(LAYERS, D, HEADS, text_vocab, TEXT_LEN, GLU, "cpu").eval()
    dec2 = DalleBartDecoder(CODES, D, HEADS, GLU, LAYERS, "cpu").eval()
    enc2.load_state_dict(torch.load(os.path.join(back, "encoder_mini.pt"), weights_only=True), strict=True)
    dec2.load_state_dict(torch.load(os.path.join(back, "decoder_mini.pt"), weights_only=True), strict=True)
    text = padded(min_dalle_tokenizer(back, "_mini"), CAPTIONS)
    codes = torch.randint(0, CODES, (2, 256), generator=torch.Generator().manual_seed(0))
    inputs = tuned.model.decoder_inputs(codes)
    expected = min_dalle_logits(enc2, dec2, text, inputs)[..., :CODES]
    ids, mask = tuned.encode_prompts(CAPTIONS)
    with torch.no_grad():
        ours = tuned.model(ids, mask, inputs.repeat(2, 1))
    assert (ours - expected).abs().max().item() < 1e-5

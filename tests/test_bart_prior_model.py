"""Prior network and folder format: round-trips, presets, pretrained text encoder, clear errors."""
import json
import os

import pytest
import torch

from bart_prior import BartPrior, PriorConfigError, PriorModel, preset
from core.errors import ConfigError, ModelFolderError
from bart_prior.model import resolve_text_encoder

from _bart_prior_helpers import make_tokenizer, tiny_prior, one_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"))


def test_layout_untied_and_sizes(tok):
    prior = tiny_prior(tok, codebook_size=64, grid=(4, 4))
    m = prior.model
    assert m.decoder.embed_tokens.num_embeddings == 65 and m.lm_head.weight.shape == (65, 32)
    assert m.lm_head.bias is None
    assert m.encoder.embed_tokens.num_embeddings == len(tok)
    ptrs = {m.decoder.embed_tokens.weight.data_ptr(), m.encoder.embed_tokens.weight.data_ptr(),
            m.lm_head.weight.data_ptr()}
    assert len(ptrs) == 3
    assert m.decoder.embed_tokens.padding_idx is None  # no image code is frozen as padding
    ids, mask = prior.encode_prompts(["a red circle", "a blue square"])
    codes = torch.randint(0, 64, (2, 4, 4))
    logits = m(ids, mask, m.decoder_inputs(codes))
    assert logits.shape == (2, 16, 64)
    assert m.decoder_inputs(codes)[:, 0].eq(64).all() and torch.equal(m.decoder_inputs(codes)[:, 1:],
                                                                      codes.view(2, -1)[:, :-1])


def test_presets_are_the_published_dalle_mini_and_mega_shapes():
    from bart_prior import DalleBartModel, build_model

    with torch.device("meta"):
        mini, mega = build_model(preset("mini")), build_model(preset("mega"))
    assert isinstance(mini, DalleBartModel) and mini.num_parameters() == 437_833_712  # DALL·E Mini, as published
    assert abs(mega.num_parameters() - 2.59e9) / 2.59e9 < 0.005
    shapes = {"mini": (mini, 50264, 16385, 2730, 1024), "mega": (mega, 50272, 16416, 4096, 2048)}
    for name, (m, text_rows, image_rows, glu, d) in shapes.items():
        assert m.encoder.embed_tokens.weight.shape == (text_rows, d), name
        assert m.decoder.embed_tokens.weight.shape == m.lm_head.weight.shape == (image_rows, d), name
        assert m.encoder.layers[0].glu.fc0.weight.shape == (glu, d) and m.cfg.seq_len == 256
        assert m.decoder.embed_positions.weight.shape == (256, d) and m.encoder.embed_positions.weight.shape == (64, d)
        assert not any(n.endswith(".bias") and "norm" not in n and "ln" not in n for n, _ in m.named_parameters())
    with pytest.raises(ConfigError, match="unknown bart_prior preset 'huge'; choose one of .*mega.*mini"):
        preset("huge")


def test_save_load_round_trip(tok, tmp_path):
    prior = tiny_prior(tok, codebook_size=64, grid=(4, 4))
    out = str(tmp_path / "prior")
    prior.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    loaded = BartPrior.from_pretrained(out)
    assert loaded.codebook_size == 64 and loaded.grid == (4, 4)
    ids, mask = prior.encode_prompts(["a red circle", "ünïcödé"])
    dec = torch.randint(0, 65, (2, 16))
    with torch.inference_mode():
        assert torch.equal(prior(ids, mask, dec), loaded(ids, mask, dec))
    assert torch.equal(prior.generate(["a red circle"], 2, condition_scale=2.0, seed=3),
                       loaded.generate(["a red circle"], 2, condition_scale=2.0, seed=3))
    with pytest.raises(ModelFolderError, match="is not a BartPrior folder \\(no model.safetensors\\)"):
        os.remove(os.path.join(out, "model.safetensors"))
        BartPrior.from_pretrained(out)


def test_pretrained_text_encoder(tok, tmp_path):
    from transformers import BartConfig, BartModel

    hf_cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=40)
    BartModel(hf_cfg).save_pretrained(str(tmp_path / "bart"))
    hf = BartModel.from_pretrained(str(tmp_path / "bart"))
    cfg = resolve_text_encoder(preset("tiny", codebook_size=64, grid=[4, 4], text_encoder_from=str(tmp_path / "bart")))
    assert cfg.encoder_layers == 2 and cfg.ffn_dim == 48 and cfg.text_positions == 40
    m = PriorModel(cfg)
    assert torch.equal(m.encoder.embed_tokens.weight, hf.shared.weight)
    assert torch.equal(m.encoder.layers[1].fc1.weight, hf.encoder.layers[1].fc1.weight)
    with pytest.raises(PriorConfigError, match="no BART checkpoint"):
        resolve_text_encoder(preset("tiny", codebook_size=64, grid=[4, 4], text_encoder_from=str(tmp_path / "nope")))
    with pytest.raises(PriorConfigError, match="d_model"):
        resolve_text_encoder(preset("shapes", codebook_size=64, grid=[4, 4], text_encoder_from=str(tmp_path / "bart")))


def test_saved_config_is_plain_json(tok, tmp_path):
    tiny_prior(tok).save_pretrained(str(tmp_path / "p"))
    cfg = json.load(open(tmp_path / "p" / "config.json"))
    assert cfg["codebook_size"] == 64 and cfg["grid"] == [4, 4] and cfg["text_vocab_size"] == len(tok)


@pytest.mark.parametrize("arch", ["bart", "dallebart"])
def test_both_architectures_train_under_bf16_autocast(tok, arch):
    """One mixed-precision step on the CPU, as trainer.precision bf16-mixed runs it: forward, loss, backward."""
    prior = tiny_prior(tok, codebook_size=64, grid=(4, 4), arch=arch).train()
    ids, mask = prior.encode_prompts(["a red circle", "a blue square"])
    codes = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prior.model(ids, mask, prior.model.decoder_inputs(codes))
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 64), codes.reshape(-1))
    loss.backward()
    grads = [p.grad for p in prior.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


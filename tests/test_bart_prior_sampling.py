"""Guided sampling: cache = no cache, scale 1 = plain conditional, batch-size independence, codebook-only ids."""
import pytest
import torch

from bart_prior.sampling import SamplingOptions, candidate_seed, candidate_uniforms, sample_codes

from _bart_prior_helpers import make_tokenizer, tiny_prior, one_thread  # noqa: F401 (autouse)

PROMPTS = ["a red circle", "a blue square", "a purple hexagon"]


@pytest.fixture(scope="module", params=["bart", "dallebart"])
def prior(tmp_path_factory, request):
    """Every sampling test runs on both architectures: the cached sampler serves both."""
    tok = make_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"))
    return tiny_prior(tok, codebook_size=64, grid=(4, 4), arch=request.param)


@pytest.mark.parametrize("opts", [dict(condition_scale=3.0, top_k=8), dict(condition_scale=2.0, top_p=0.8),
                                  dict(condition_scale=1.0, temperature=0.7)])
def test_cached_equals_uncached(prior, opts):
    a = prior.generate(PROMPTS, num_candidates=3, seed=5, **opts)
    b = prior.generate(PROMPTS, num_candidates=3, seed=5, use_cache=False, **opts)
    assert a.shape == (3, 3, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # candidates differ


def test_guidance_scale_one_is_plain_conditional(prior):
    ids, mask = prior.encode_prompts(PROMPTS)
    rows = torch.tensor([0, 0, 1, 2])
    uniforms = candidate_uniforms([candidate_seed(1, int(p), c) for c, p in enumerate(rows)], 16)
    opts = SamplingOptions(condition_scale=1.0, top_k=16)
    guided = sample_codes(prior.model, ids, mask, rows, uniforms, opts, empty_ids=prior.empty_prompt_ids())
    plain = sample_codes(prior.model, ids, mask, rows, uniforms, opts, empty_ids=None)
    assert torch.equal(guided, plain)
    stronger = sample_codes(prior.model, ids, mask, rows, uniforms, SamplingOptions(condition_scale=8.0, top_k=16),
                            empty_ids=prior.empty_prompt_ids())
    assert not torch.equal(stronger, plain)  # the unconditional rows do take part


def test_candidates_do_not_depend_on_batch_size(prior):
    full = prior.generate(PROMPTS, num_candidates=4, condition_scale=3.0, top_k=20, seed=11, batch_size=8)
    ones = prior.generate(PROMPTS, num_candidates=4, condition_scale=3.0, top_k=20, seed=11, batch_size=1)
    assert torch.equal(full, ones)
    # a prompt sampled alone gets the same candidates as within the batch
    alone = prior.generate(PROMPTS[:1], num_candidates=2, condition_scale=3.0, top_k=20, seed=11)
    assert torch.equal(alone[0], full[0, :2])
    assert not torch.equal(prior.generate(PROMPTS[:1], 2, condition_scale=3.0, top_k=20, seed=12)[0], alone[0])


def test_log_likelihood_scores_each_code_given_its_prefix(prior):
    codes = prior.generate(PROMPTS, num_candidates=3, temperature=0.7, seed=2)
    ll = prior.log_likelihood(PROMPTS, codes, temperature=0.7, batch_size=4)
    assert ll.shape == (3, 3) and (ll < 0).all()
    assert torch.allclose(prior.log_likelihood(PROMPTS, codes, temperature=0.7, batch_size=1), ll, atol=1e-4)
    # the reference: every position scored from its own prefix, one forward pass per position (catches a shift)
    ids, mask = prior.encode_prompts(PROMPTS[1:2])
    seq, start, total = codes[1, 2], prior.model.cfg.start_token_id, 0.0
    with torch.no_grad():
        for t in range(seq.numel()):
            logits = prior(ids, mask, torch.cat([torch.tensor([start]), seq[:t]])[None])[0, -1]
            total += float(torch.log_softmax(logits / 0.7, -1)[seq[t]])
    assert float(ll[1, 2]) == pytest.approx(total, abs=1e-3)
    # greedy codes are each their prefix's favourite: a sharper temperature makes them more likely
    greedy = prior.generate(PROMPTS[:1], 1, temperature=0)
    assert prior.log_likelihood(PROMPTS[:1], greedy, 0.5) > prior.log_likelihood(PROMPTS[:1], greedy, 1.0)
    with pytest.raises(ValueError, match="codebook"):
        prior.log_likelihood(PROMPTS[:1], torch.full((1, 1, 16), 64))
    with pytest.raises(ValueError, match="codes must be"):
        prior.log_likelihood(PROMPTS, codes[:2])


def test_never_samples_past_the_codebook(prior):
    """Make the start token (and, for the dallebart prior, the unused ids past the codebook, as in DALL·E Mega) the
    overwhelming favourites of the head: they must still never come out."""
    prior = tiny_prior(prior.tokenizer, seed=1, arch=prior.config.arch)
    model = prior.model
    codebook, rows = model.cfg.codebook_size, model.lm_head.weight.shape[0]
    assert rows == model.cfg.decoder_vocab_size > codebook and model.cfg.start_token_id >= codebook
    # every hidden state the head reads becomes the all-ones vector
    last = model.decoder.final_ln if model.cfg.arch == "dallebart" else model.decoder.layers[-1].final_layer_norm
    last.register_forward_hook(lambda module, args, out: torch.ones_like(out))
    with torch.no_grad():
        model.lm_head.weight[codebook:] = 100.0
    for opts in (dict(condition_scale=4.0), dict(temperature=5.0), dict(top_p=0.99), dict(temperature=0)):
        for cache in (True, False):
            codes = prior.generate(PROMPTS, num_candidates=4, seed=0, use_cache=cache, **opts)
            assert int(codes.min()) >= 0 and int(codes.max()) < codebook


def test_prompt_edge_cases(prior):
    shown = r"'a red circle a red circle a red circl\.\.\.'"  # long prompts are shown by their first 37 characters
    with pytest.warns(UserWarning, match=shown + r" has \d+ tokens; truncated") as long_w:
        long = prior.generate(["a red circle " * 40], num_candidates=1, seed=0)
    with pytest.warns(UserWarning, match="empty") as empty_w:
        empty = prior.generate([""], num_candidates=1, seed=0)
    # the warnings name the caller's line (here this test), not torch's inference_mode wrapper or the prior's code
    assert {w.filename for w in [*long_w, *empty_w]} == {__file__}
    unicode = prior.generate(["ünïcödé 日本 🙂"], num_candidates=1, seed=0)
    assert long.shape == empty.shape == unicode.shape == (1, 1, 16)
    with pytest.raises(ValueError):
        prior.generate(PROMPTS, num_candidates=0)


def test_bf16_matrix_products_stay_close_to_fp32(prior):
    """precision="bf16" keeps attention, norms and sampling in fp32: the step logits stay within bf16 rounding of
    the fp32 ones (sampled sequences then differ: a random model's near-ties flip, and later steps follow)."""
    from bart_prior.sampling import _CachedDecoder, _encode_rows

    ids, mask = prior.encode_prompts(PROMPTS)
    rows = torch.tensor([0, 1, 2, 0])
    hidden, m, src = _encode_rows(prior.model, ids, mask, rows, prior.empty_prompt_ids())
    with torch.inference_mode():
        steps = {dt: _CachedDecoder(prior.model, hidden, m, src, guided=True, matmul_dtype=dt)
                 for dt in (torch.float32, torch.bfloat16)}
        tokens = torch.randint(0, 64, (16, 8))
        for pos in range(16):
            tok = torch.cat([tokens[pos], tokens[pos]])
            a, b = (dec.logits(dec.step(tok, pos)) for dec in (steps[torch.float32], steps[torch.bfloat16]))
            assert a.dtype == b.dtype == torch.float32 and a.shape == (8, 64)
            assert (a - b).abs().max() < 0.05 * a.std() + 1e-3
    codes = prior.generate(PROMPTS, 2, condition_scale=3.0, top_k=8, seed=3, precision="bf16")
    assert codes.shape == (3, 2, 16) and int(codes.max()) < 64 and int(codes.min()) >= 0


def test_precision_auto_and_bad_values(monkeypatch):
    from bart_prior import sampling
    from bart_prior.sampling import CPU_BF16_MIN_WORK, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(sampling, "bf16_is_fast", lambda device: False)
    assert resolve_precision("auto", cpu, rows=4096, d_model=1024) == "fp32"  # a CPU without fast bf16
    monkeypatch.setattr(sampling, "bf16_is_fast", lambda device: True)
    assert resolve_precision("auto", cpu, rows=CPU_BF16_MIN_WORK // 128, d_model=128) == "bf16"
    assert resolve_precision("auto", cpu, rows=CPU_BF16_MIN_WORK // 128 - 1, d_model=128) == "fp32"  # too little work
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp16", torch.device("cpu"))

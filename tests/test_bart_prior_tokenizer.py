"""Caption tokenizer: CLI training on a shard set, loading, and the too-small-vocabulary error."""
import pytest

from bart_prior.tokenizer import TokenizerError, load_tokenizer, main

from _bart_prior_helpers import write_code_shards, one_thread  # noqa: F401 (autouse)


def test_train_cli_round_trip(tmp_path, capsys):
    pattern = write_code_shards(str(tmp_path / "shards"), 96, per_shard=48)
    out = str(tmp_path / "tok")
    assert main(["train", "--input", pattern, "--vocab-size", "400", "--out", out, "--min-frequency", "1"]) == 0
    assert "tokens" in capsys.readouterr().out
    tok = load_tokenizer(out, min_vocab=270)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(tok) <= 400
    ids = tok("A Red Circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 5  # <s> a red circle </s>: whole words were learned
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle"
    assert tok.decode(tok("日本 ü")["input_ids"], skip_special_tokens=True).strip() == "日本 ü"
    assert tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]
    assert {tok.pad_token, tok.unk_token, tok.mask_token} == {"<pad>", "<unk>", "<mask>"}


def test_too_small_vocab_and_missing_folder(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    five = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(specials, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    five.save_pretrained(str(tmp_path / "five"))
    with pytest.raises(TokenizerError, match="5 tokens"):
        load_tokenizer(str(tmp_path / "five"), min_vocab=1000)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("facebook/bart-base")
    pattern = write_code_shards(str(tmp_path / "shards"), 8)
    assert main(["train", "--input", pattern, "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert "too small" in capsys.readouterr().err


def test_module_cli_runs_without_import_warnings(tmp_path):
    """`python -m bart_prior.tokenizer` as the demo runs it: the package must not import the module it executes
    (runpy would warn that it was found in sys.modules)."""
    import os
    import subprocess
    import sys

    pattern = write_code_shards(str(tmp_path / "shards"), 48)
    out = str(tmp_path / "tok")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "bart_prior.tokenizer", "train",
                          "--input", pattern, "--vocab-size", "300", "--out", out, "--min-frequency", "1"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr and len(load_tokenizer(out)) <= 300

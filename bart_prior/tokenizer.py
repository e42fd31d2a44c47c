"""Caption tokenizer: train a byte-level BPE on a shard set's captions, or load any Hugging Face tokenizer folder.

    python -m bart_prior.tokenizer train --input 'shards/train/{000000..000009}.tar' --vocab-size 2048 --out DIR

The saved folder loads with ``AutoTokenizer`` and uses BART's special tokens (<s>, <pad>, </s>, <unk>, <mask>),
so a real BART tokenizer folder can be dropped in instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Iterator

from core.errors import ConfigError, UserError
from core.files import atomic_folder

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class TokenizerError(ConfigError):
    """A tokenizer that cannot be used: missing folder, or fewer tokens than the model expects."""


def iter_captions(pattern: str, caption_key: str = "txt") -> Iterator[str]:
    """Captions of a shard set in file order, decoded as training decodes them (a caption that is not UTF-8 is
    skipped and counted); only the caption members are decoded (images are skipped)."""
    from data import iter_captions as shared

    return shared(pattern, caption_key)


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_dir: str, lowercase: bool = True,
                    min_frequency: int = 2, max_length: int = 64):
    """Train a byte-level BPE on ``captions`` and save it (atomically) as a tokenizer folder; returns it loaded."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                             f"{len(SPECIAL_TOKENS) + 256} tokens (256 bytes + {len(SPECIAL_TOKENS)} special)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for caption in captions:
            count += 1
            yield caption

    tok.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise TokenizerError("no captions to train the tokenizer on")
    # BART frames every caption as <s> ... </s>
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), add_prefix_space=True)
    fast = _with_bart_specials(tok, max_length)
    with atomic_folder(out_dir) as tmp:
        fast.save_pretrained(tmp)
    return load_tokenizer(out_dir)


def _with_bart_specials(tok, max_length: int, mask: bool = True):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>" if mask else None, cls_token="<s>",
                                   sep_token="</s>", model_max_length=max_length)


def tokenizer_from_bpe_files(vocab: str, merges: str, max_length: int = 64):
    """A BART tokenizer from a byte-level BPE's ``vocab.json`` + ``merges.txt`` (BART's, DALL·E Mini's and min-dalle's
    files), set up as transformers' ``BartTokenizerFast`` is by default: no prefix space, ``<s> ... </s>``.

    Built with ``tokenizers`` directly because transformers 4 and 5 take these files through different arguments.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise TokenizerError(f"{vocab} + {merges}: not a BPE vocabulary ({str(exc).splitlines()[0][:200]})") from None
    for token in SPECIAL_TOKENS[:4]:
        if tok.token_to_id(token) is None:
            raise TokenizerError(f"{vocab}: no {token} token (BART needs <s>, <pad>, </s>, <unk>)")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), add_prefix_space=False)
    # an absent <mask> would be appended as a new id, changing the vocabulary size
    return _with_bart_specials(tok, max_length, mask=tok.token_to_id("<mask>") is not None)


def load_tokenizer(dir_or_name: str, min_vocab: int = 0):
    """Load a tokenizer folder (ours or a saved BART one); fewer than ``min_vocab`` tokens is an error.

    Only local folders: an offline hub name can silently yield an empty 5-token tokenizer, which would train a
    model that cannot tell captions apart.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(dir_or_name):
        raise TokenizerError(f"tokenizer folder not found: {dir_or_name} (train one with "
                             f"`python -m bart_prior.tokenizer train --input PATTERN --vocab-size N --out DIR`)")
    from core.files import read_json

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        path = os.path.join(dir_or_name, name)
        if os.path.exists(path):
            read_json(path)  # one line naming the file when it is not JSON
    if not any(os.path.exists(os.path.join(dir_or_name, n)) for n in ("tokenizer.json", "vocab.json")):
        raise TokenizerError(f"{dir_or_name}: no tokenizer.json (nor vocab.json + merges.txt): not a tokenizer "
                             "folder, or one with a file missing")
    if not os.path.exists(os.path.join(dir_or_name, "tokenizer_config.json")):
        raise TokenizerError(f"{dir_or_name}: no tokenizer_config.json (it names <s>, </s> and <pad>); save the "
                             "tokenizer again with save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(dir_or_name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load tokenizer from {dir_or_name}: {str(exc).splitlines()[0]}") from None
    if len(tok) < max(min_vocab, len(SPECIAL_TOKENS) + 1):
        raise TokenizerError(f"tokenizer {dir_or_name} has {len(tok)} tokens, expected at least {min_vocab}: "
                             "a wrong or empty tokenizer folder")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name) is None:
            raise TokenizerError(f"tokenizer {dir_or_name} has no {name[:-3]} (BART needs <s>, </s>, <pad>)")
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bart_prior.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a byte-level BPE on the captions of a shard set")
    tr.add_argument("--input", required=True, help="shard pattern (braces, globs, 'a::b')")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--min-frequency", type=int, default=2)
    tr.add_argument("--no-lowercase", action="store_true", help="keep the captions' case")
    tr.add_argument("--caption-key", default="txt")
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(iter_captions(args.input, args.caption_key), args.vocab_size, args.out,
                              lowercase=not args.no_lowercase, min_frequency=args.min_frequency)
    except UserError as exc:  # TokenizerError, and DataError from the shard pattern
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out under a regular file, a full disk...
        from data.errors import os_error

        print(f"error: {os_error(exc)}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(tok)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

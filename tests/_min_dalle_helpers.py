"""min-dalle 0.4.11's own modules for the parity tests: small random DalleBarts built with its classes, its files,
its tokenizer and its teacher-forced logits. min-dalle is a test reference only (installed with --no-deps)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from bench._min_dalle import import_min_dalle


DalleBartEncoder = import_min_dalle("models.dalle_bart_encoder").DalleBartEncoder
DalleBartDecoder = import_min_dalle("models.dalle_bart_decoder").DalleBartDecoder
TextTokenizer = import_min_dalle("text_tokenizer").TextTokenizer

D, HEADS, GLU, LAYERS, TEXT_LEN, IMAGE_LEN, CODES = 64, 4, 96, 2, 64, 256, 16384
SCALELESS = ("pre_self_attn_layer_norm", "pre_encoder_attn_layer_norm", "glu.ln0", "glu.ln1", "final_ln")
PROMPTS = ["a cat", "a red car under the sky", "sunset over the sea", "photo of a house", "zebra",
           "a small bird flying over a big mountain river at night", "painting of a blue tree", "the city at night",
           "a dog running on the beach", "an avocado armchair", "a green dragon sitting in a castle", "river",
           "two cats and three dogs", "a photo of 3 birds", "the big small house", "quantum physics painting",
           "a mountain with snow", "oil painting of a sailing ship in a storm", "a bowl of soup",
           "an astronaut riding a horse"]
# words the tiny BPE learns whole; the prompts' other words ("zebra", "quantum", ...) split into pieces
CORPUS_WORDS = ("a an the of on in at over under with and cat cats dog dogs red blue green car sky sea sunset photo "
                "house small big bird birds flying mountain river night painting tree city running beach sitting "
                "two three snow oil ship storm bowl soup riding horse castle").split()
def write_bpe(folder: str, vocab_name: str = "vocab.json", merges_name: str = "merges.txt") -> None:
    """A tiny byte-level BPE with BART's special ids (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    n = len(CORPUS_WORDS)
    tok.train_from_iterator([" ".join(CORPUS_WORDS[i:] + CORPUS_WORDS[:i]) for i in range(n)], trainer=trainer)
    os.makedirs(folder, exist_ok=True)
    vocab, merges = tok.model.save(folder)
    table = json.load(open(vocab))
    table["<mask>"] = len(table)
    os.remove(vocab)
    json.dump(table, open(os.path.join(folder, vocab_name), "w"))
    os.replace(merges, os.path.join(folder, merges_name))


def min_dalle_tokenizer(folder: str, suffix: str = "") -> TextTokenizer:
    vocab = json.load(open(os.path.join(folder, f"vocab{suffix}.json"), encoding="utf8"))
    merges = open(os.path.join(folder, f"merges{suffix}.txt"), encoding="utf8").read().split("\n")[1:-1]
    return TextTokenizer(vocab, merges)  # as MinDalle.init_tokenizer reads the files


def reference(text_vocab: int, image_vocab: int, seed: int):
    torch.manual_seed(seed)
    enc = DalleBartEncoder(layer_count=LAYERS, embed_count=D, attention_head_count=HEADS, text_vocab_count=text_vocab,
                           text_token_count=TEXT_LEN, glu_embed_count=GLU, device="cpu").eval()
    dec = DalleBartDecoder(image_vocab_count=image_vocab, embed_count=D, attention_head_count=HEADS,
                           glu_embed_count=GLU, layer_count=LAYERS, device="cpu").eval()
    with torch.no_grad():
        for module in (enc, dec):
            for name, m in module.named_modules():
                if isinstance(m, nn.LayerNorm):
                    m.bias.normal_(0, 0.5)
                    if not name.endswith(SCALELESS):
                        m.weight.normal_(1, 0.3)
        # rows past the codebook (the start token; Mega's unused ids) would win every argmax if they were sampled
        dec.lm_head.weight[CODES:] *= 30
    return enc, dec


def md_state(module: nn.Module, keep_ones: bool) -> dict:
    """min-dalle's file: its published ones omit the scale-less norms' weights."""
    return {k: v.clone() for k, v in module.state_dict().items()
            if keep_ones or not (k.endswith(".weight") and k[: -len(".weight")].endswith(SCALELESS))}


def padded(tokenizer: TextTokenizer, prompts: list[str]) -> torch.Tensor:
    rows = [tokenizer.tokenize(p) for p in prompts]
    return torch.tensor([r + [1] * (TEXT_LEN - len(r)) for r in rows])  # min-dalle's encoder reads 64 tokens


def min_dalle_logits(enc, dec, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through min-dalle's modules: encoder row r is paired with tokens[r % len(tokens)]."""
    with torch.no_grad():
        # its encoder's position ids are made for two rows (MinDalle's unconditional + conditional caption)
        state = torch.cat([enc(text[i: i + 2]) for i in range(0, len(text), 2)])
        logits, _ = dec(attention_mask=text.ne(1)[:, None, None, :], encoder_state=state,
                        attention_state=torch.zeros(LAYERS, 1), prev_tokens=tokens,
                        token_index=torch.arange(tokens.shape[1]))
    return logits

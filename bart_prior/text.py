"""DALL·E Mini's caption normalisation, for priors converted from its checkpoints (they were trained on it).

Behaviour matches ``dalle_mini.model.text.TextNormalizer`` (dalle-mini 0.1.5) rule for rule and in the same order,
with two documented differences: the optional hashtag splitting needs a word-frequency file given by path (the
original downloads ``enwiki-words-frequency.txt`` from the hub), and the phrase that replaces a ``<person>`` token
is drawn from a generator seeded per call instead of the global ``random`` state. Pure Python: no torch.
"""
from __future__ import annotations

import html
import math
import os
import random
import re
from typing import Callable, Optional, Union

import emoji
import ftfy
from unidecode import unidecode

# Phrases for a lone CC12M "<person>" token, weighted by how often English Wikipedia uses them (dalle-mini's counts).
PERSON_PHRASES = (("a person", 282265), ("someone", 121194), ("somebody", 12219))
_PHRASES, _WEIGHTS = zip(*PERSON_PHRASES)

# Placeholders hide the dots, apostrophes and slashes worth keeping while punctuation becomes commas. They are the
# original's exact strings: a hashtag can swallow one (``#it's``), so even their spelling changes the output.
_MARK = "xtokx"
_DOT, _QUOTE, _SLASH = (f"{_MARK}{name}{_MARK}" for name in ("dot", "quote", "slash"))

_PERSON_GROUP = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")
_WIKI_REF_START = re.compile(r"\A\s*\[\d+\]")
_WIKI_REF_END = re.compile(r"\[\d+\]\s*\Z")
_HTML_TAG = re.compile(r"<[^<]+?>")
_URL = re.compile(r"http\S+")
_THOUSANDS = re.compile(r"(\d),(\d{3})")
_PROTECT = (  # (pattern, replacement) applied in this order before punctuation is flattened
    (re.compile(r"(\w)\.(\w)"), rf"\1{_DOT}\2"),
    # the "ll" alternative appears twice in the original; harmless, kept out
    (re.compile(r"'(?=([stdm]|ll|re|ve)\b)"), _QUOTE),
    (re.compile(r"(\d)/(\d)"), rf"\1{_SLASH}\2"),
)
# restored in the original's order: it matters for a caption that itself spells "xtokxdotxtokxquotextokx"
_RESTORE = ((_DOT, "."), (_QUOTE, "'"), (_SLASH, "/"))
_INNER_HYPHEN = re.compile(r"(\w)-(\w)")
_SPACED_SYMBOL = re.compile(r"([%&/$*])")
_HASHTAG = re.compile(r"#(\w+)")
_IGNORED = re.compile(r"[_#\\]")
_ANY_QUOTE = re.compile(r"['\"`]")
_PUNCTUATION = re.compile(r"[()\[\].,|:;?!=+~\-/{}]")
_REPEATED = re.compile(r"(\D)(\1{3,})")
_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_SPACES = re.compile(r"\s+")


class HashtagSplitter:
    """Splits a run-together hashtag body into words ("sunsetbeach" -> "sunset beach") by dynamic programming.

    ``word_frequencies`` is a text file with one word per line, most frequent first (only the first whitespace-
    separated field of a line counts); a word on line ``n`` costs ``log(n)``, so a repeated word keeps its last
    line. A substring not in the file costs infinity, so text made only of unknown words falls apart into single
    characters, as in the original (the real file lists every letter, so this rarely shows).
    """

    _PIECES = re.compile(r"[^a-zA-Z0-9']+")

    def __init__(self, word_frequencies: Union[str, os.PathLike]) -> None:
        with open(word_frequencies, encoding="utf8") as fh:
            lines = fh.read().splitlines()
        # the original cannot read a blank line; skipping one keeps the other words' line numbers
        self._cost = {line.split()[0]: math.log(n) for n, line in enumerate(lines, start=1) if line.split()}
        if not self._cost:
            raise ValueError(f"{os.fspath(word_frequencies)!r} lists no words")
        self._longest = max(len(word) for word in self._cost)

    def __call__(self, text: str) -> str:
        return " ".join(word for piece in self._PIECES.split(text) for word in self.split_word(piece))

    def split_word(self, s: str) -> list[str]:
        """The cheapest split of ``s`` (no separators inside) into dictionary words, left to right."""
        # best[i]: (cost, length of last word) of the cheapest split of s[:i]; comparing tuples means a cost tie
        # goes to the shorter last word, which is the original's tie-break
        best = [(0.0, 0)]
        for i in range(1, len(s) + 1):
            best.append(min((best[i - n][0] + self._cost.get(s[i - n:i].lower(), math.inf), n)
                            for n in range(1, min(i, self._longest) + 1)))
        words: list[str] = []
        end = len(s)
        while end > 0:
            n = best[end][1]
            word = s[end - n:end]
            # glue a split-off "'s" and runs of digits back onto what precedes them; a lone apostrophe never glues
            if word != "'" and words and (words[-1] == "'s" or (word[-1].isdigit() and words[-1][0].isdigit())):
                words[-1] = word + words[-1]
            else:
                words.append(word)
            end -= n
        return words[::-1]


class TextNormalizer:
    """DALL·E Mini's caption normaliser; ``normalizer(caption)`` returns the text the prior's BPE tokenizer sees.

    The result starts with one space, as the original's does, so that the byte-level BPE gives the first word its
    word-start (``Ġ``) form; an empty or blank caption gives ``" "``.

    ``word_frequencies``: path of a word list (dalle-mini's ``enwiki-words-frequency.txt``, most frequent first) used
    to split hashtags into words. Without it that step is skipped: the ``#`` is still dropped but the tag stays one
    word ("#summervibes" -> "summervibes" rather than "summer vibes"; "#it's" -> "it's", where the original splits
    the tag's placeholder-filled body and so loses the apostrophe), and everything else is identical.

    ``seed``: a ``<person>`` token (CC12M captions) that is not part of a group (which becomes "people") is replaced
    by a phrase of ``PERSON_PHRASES`` drawn at random, weighted; that is the original's only randomness, and it
    draws from the global ``random`` module. Here each call draws from a fresh ``random.Random(seed)``, so a caption
    always normalises the same way, and equals the original's output right after ``random.seed(seed)`` (with the
    default seed 0 a caption's first lone token becomes "someone"). ``seed=None`` draws from the global ``random``
    module, exactly as the original does.
    """

    def __init__(self, word_frequencies: Optional[Union[str, os.PathLike]] = None, seed: Optional[int] = 0) -> None:
        self._hashtags = HashtagSplitter(word_frequencies) if word_frequencies is not None else None
        self.seed = seed

    def __call__(self, text: str) -> str:
        t = ftfy.fix_text(text)
        t = html.unescape(html.unescape(t))  # twice: scraped captions are often escaped twice (as in CLIP's cleaner)
        t = emoji.demojize(t)  # before unidecode, which would drop emoji
        t = unidecode(t).lower()
        t = _replace_person_tokens(t, random.Random(self.seed).choices if self.seed is not None else random.choices)
        t = _WIKI_REF_END.sub("", _WIKI_REF_START.sub("", t))
        t = _HTML_TAG.sub(" ", t)
        t = _URL.sub("", t)
        # matches cannot overlap, so "1,234,567" needs a second pass
        t = _THOUSANDS.sub(r"\1\2", _THOUSANDS.sub(r"\1\2", t))
        for pattern, placeholder in _PROTECT:
            t = pattern.sub(placeholder, t)
        t = _INNER_HYPHEN.sub(r"\1 \2", t)
        t = _SPACED_SYMBOL.sub(r" \1 ", t)
        if self._hashtags is not None:
            t = _HASHTAG.sub(lambda m: self._hashtags(m.group(1)), t)
        t = _IGNORED.sub(" ", t)
        t = _ANY_QUOTE.sub(' " ', t)
        t = _PUNCTUATION.sub(",", t)
        for placeholder, char in _RESTORE:
            t = t.replace(placeholder, char)
        t = _REPEATED.sub(r"\1", t)  # 4+ repeats only: 3 would break roman numerals like "viii"
        t = _QUOTE_RUN.sub(' " ', t)
        t = _COMMA_RUN.sub(", ", t)
        t = _SPACES.sub(" ", t).strip()
        t = t[:-1] if t.endswith(",") else t
        t = t[1:] if t.startswith(",") else t
        return " " + t.strip()


def _replace_person_tokens(t: str, choices: Callable[..., list]) -> str:
    t = _PERSON_GROUP.sub(" people ", t)
    # one draw per remaining token, left to right: the order the original consumes its random numbers in
    return re.sub("<person>", lambda _: f" {choices(_PHRASES, _WEIGHTS)[0]} ", t)


_DEFAULT = TextNormalizer()


def normalize_text(text: str) -> str:
    """``TextNormalizer()(text)``: no hashtag splitting, seed 0."""
    return _DEFAULT(text)

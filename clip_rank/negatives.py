"""NegCLIP-style hard negative captions: a caption with ONE word replaced by another caption's word.

Generic (no word lists): the replacement comes from another caption of the same batch with the same number of
(whitespace-separated) words, at the same position. With template captions this gives minimal pairs, e.g.
"a small red circle in the top left ..." -> "a small red square in the top left ...", which is what a ranker must
learn to tell apart when candidates share their colours and differ in shape, size or position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def one_word_swaps(captions: Sequence[str], num: int = 1,
                   generator: Optional[torch.Generator] = None) -> list[list[str]]:
    """Up to ``num`` distinct one-word-swapped negatives for every caption of a batch.

    For caption i, a donor j is drawn uniformly among the captions with the same word count that differ from i at
    some position, then one of the positions where they differ, uniformly; caption i gets donor j's word there
    (so every negative differs from caption i in exactly one word and keeps its word count). For ``num`` > 1 the
    negatives are drawn without replacement from the distinct results of that scheme (with its probabilities).

    A caption with no such donor in the batch (no other caption of its length, or all of them identical to it)
    gets no negative: its list is empty (callers skip it). A negative is never the caption itself, but it may equal
    another caption of the batch (callers mask that pair). Words are joined back with single spaces. Randomness
    comes only from ``generator`` (torch's global generator when None), so a seeded generator gives the same
    negatives for the same batch.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    words = [str(c).split() for c in captions]
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(words):
        by_length.setdefault(len(w), []).append(i)
    out: list[list[str]] = []
    for i, wi in enumerate(words):
        if num == 0:
            out.append([])
            continue
        # every (donor, position) pair with its probability under "donor uniform, then position uniform"
        donors = []
        for j in by_length[len(wi)]:
            diff = [p for p, (a, b) in enumerate(zip(wi, words[j])) if a != b]
            if diff:
                donors.append((j, diff))
        # distinct negative = distinct (position, word); -> its probability (insertion order is deterministic)
        weights: dict[tuple[int, str], float] = {}
        for j, diff in donors:
            for p in diff:
                key = (p, words[j][p])
                weights[key] = weights.get(key, 0.0) + 1.0 / (len(donors) * len(diff))
        if not weights:
            out.append([])
            continue
        candidates = list(weights)
        probs = torch.tensor([weights[c] for c in candidates], dtype=torch.float64)
        picks = torch.multinomial(probs, min(num, len(candidates)), replacement=False, generator=generator)
        out.append([" ".join(wi[:p] + [w] + wi[p + 1:]) for p, w in (candidates[k] for k in picks.tolist())])
    return out


def flatten_negatives(negatives: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Per-caption negative lists -> (all negatives in order, the index of the caption each belongs to)."""
    texts, owners = [], []
    for i, negs in enumerate(negatives):
        texts.extend(negs)
        owners.extend([i] * len(negs))
    return texts, owners

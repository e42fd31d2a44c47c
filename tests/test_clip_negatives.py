"""NegCLIP-style hard negatives: the one-word swap, the loss with extra image->text columns, training with them."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch.utils.data import DataLoader

from _clip_helpers import RepeatBatch, one_thread, square_batch, tiny_cfg
from clip_rank.negatives import flatten_negatives, one_word_swaps
from clip_rank.training import (ClipModule, HardNegativeClipLoss, hard_negative_scores, make_clip_loss,
                                negative_mask)
from launch.config import ConfigError

_single_thread = pytest.fixture(autouse=True)(one_thread)

CAPTIONS = [
    "a small red circle in the top left on a blue background",
    "a large red square in the top left on a blue background",
    "a small green cross in the bottom right on a white background",
    "a small red circle in the center on a blue background",  # 11 words: no donor of its length
    "a small red circle in the top left on a blue background",  # a duplicate of caption 0
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _diff(a: str, b: str) -> list:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb)
    return [p for p, (x, y) in enumerate(zip(wa, wb)) if x != y]


def test_swap_changes_exactly_one_word_from_a_same_length_caption():
    for seed in range(20):
        negatives = one_word_swaps(CAPTIONS, 1, _gen(seed))
        assert len(negatives) == len(CAPTIONS) and negatives[3] == []  # no other 11-word caption
        for i in (0, 1, 2, 4):
            (neg,) = negatives[i]
            assert neg != CAPTIONS[i] and len(neg.split()) == len(CAPTIONS[i].split())
            (p,) = _diff(CAPTIONS[i], neg)
            donors = [c for c in CAPTIONS if len(c.split()) == len(neg.split())]
            assert neg.split()[p] in {c.split()[p] for c in donors}  # the word comes from a batch caption


def test_swap_is_deterministic_for_a_seed_and_varies_across_seeds():
    assert one_word_swaps(CAPTIONS, 2, _gen(3)) == one_word_swaps(CAPTIONS, 2, _gen(3))
    draws = {tuple(one_word_swaps(CAPTIONS, 1, _gen(s))[0]) for s in range(30)}
    assert len(draws) > 2
    # caption 0 vs 1 differ in "small/large" and "circle/square"; vs 2 in 6 words: every swap is reachable
    assert {"a large red circle in the top left on a blue background",
            "a small red square in the top left on a blue background"} <= {d[0] for d in draws}


def test_several_negatives_are_distinct_and_bounded_by_the_alternatives():
    caps = ["a red square on the left", "a blue square on the left", "a red square on the right"]
    negatives = one_word_swaps(caps, 5, _gen(0))
    assert sorted(negatives[0]) == ["a blue square on the left", "a red square on the right"]  # only 2 exist
    for i, negs in enumerate(negatives):
        assert len(set(negs)) == len(negs) and caps[i] not in negs
        assert all(len(_diff(caps[i], n)) == 1 for n in negs)
    assert one_word_swaps(caps, 0, _gen(0)) == [[], [], []]
    assert one_word_swaps(["same words", "same words"], 1, _gen(0)) == [[], []]  # identical: no alternative
    with pytest.raises(ValueError):
        one_word_swaps(caps, -1)
    texts, owners = flatten_negatives([["x", "y"], [], ["z"]])
    assert texts == ["x", "y", "z"] and owners == [0, 0, 2]


def test_negative_mask_marks_negatives_that_are_a_rows_own_caption():
    mask = negative_mask(["a b", "a  c", "a b"], ["a c", "a d", "a b"])
    assert mask.tolist() == [[False, False, True], [True, False, False], [False, False, True]]


def _features(b: int = 8, n_neg: int = 8, d: int = 16, seed: int = 0):
    g = _gen(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return unit(b, d), unit(b, d), unit(n_neg, d), torch.tensor(10.0)


def test_loss_with_hard_negatives():
    img, txt, neg, scale = _features()
    plain = ClipLoss()(img, txt, scale)
    loss_fn = make_clip_loss()
    assert isinstance(loss_fn, HardNegativeClipLoss)
    # no negatives = open_clip's loss, exactly
    assert torch.equal(loss_fn(img, txt, scale), plain)
    assert torch.equal(loss_fn(img, txt, scale, negative_features=neg[:0]), plain)
    with_neg = loss_fn(img, txt, scale, negative_features=neg)
    assert with_neg > plain
    labels = torch.arange(8)
    expected = (F.cross_entropy(scale * img @ torch.cat([txt, neg]).T, labels)
                + F.cross_entropy(scale * txt @ img.T, labels)) / 2  # text->image unchanged
    torch.testing.assert_close(with_neg, expected)
    # masked-out negatives are no columns at all
    everything = torch.ones(8, 8, dtype=torch.bool)
    torch.testing.assert_close(loss_fn(img, txt, scale, negative_features=neg, negative_mask=everything), plain)
    # the diagnostics: each image against its own negatives only
    own = hard_negative_scores(img, txt, neg, list(range(8)), scale)
    pos, negs = (img * txt).sum(1), (img * neg).sum(1)
    torch.testing.assert_close(own["loss"], F.softplus(scale * (negs - pos)))
    assert own["acc"].tolist() == (pos > negs).float().tolist()
    two = hard_negative_scores(img, txt, neg, [0, 0, 1, 1, 1, 5, 5, 5], scale)
    assert len(two["loss"]) == 3  # images 0, 1 and 5 have negatives
    assert two["acc"][0] == float(pos[0] > negs[:2].max())


@pytest.mark.parametrize("local_loss", [True, False])
def test_loss_under_ddp_uses_local_negatives(monkeypatch, local_loss):
    """world_size 2 with the gather faked: this rank's rows get its own negatives, labels are offset by rank."""
    img, txt, neg, scale = _features(b=8)
    rank, n = 1, 4
    monkeypatch.setattr("open_clip.loss.gather_features", lambda *a, **k: (img, txt))
    loss_fn = make_clip_loss(rank=rank, world_size=2, local_loss=local_loss)
    local_img, local_txt, local_neg = img[n:], txt[n:], neg[:3]
    got = loss_fn(local_img, local_txt, scale, negative_features=local_neg)
    labels = torch.arange(n) + rank * n
    i2t = F.cross_entropy(scale * local_img @ torch.cat([txt, local_neg]).T, labels)
    if local_loss:
        t2i = F.cross_entropy(scale * local_txt @ img.T, labels)
    else:
        t2i = F.cross_entropy(scale * txt @ img.T, torch.arange(2 * n))
    torch.testing.assert_close(got, (i2t + t2i) / 2)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_module_off_by_default_and_negatives_raise_the_training_loss(tmp_path):
    batch = square_batch(8)
    torch.manual_seed(0)
    off = ClipModule(tiny_cfg(str(tmp_path)))
    assert off.cfg.loss.hard_negatives == 0
    torch.manual_seed(0)
    on = ClipModule(tiny_cfg(str(tmp_path), ["loss.hard_negatives=1"]))
    with torch.no_grad():
        img, txt, scale = off.model(batch["image"], batch["caption"])
        assert torch.equal(off.training_step(batch, 0), ClipLoss()(img, txt, scale))
        assert on.training_step(batch, 0) > off.training_step(batch, 0)
        torch.testing.assert_close(on.training_step(batch, 0), on.training_step(batch, 0))  # same step, same draw
    with pytest.raises(ConfigError, match="hard_negatives"):
        ClipModule(tiny_cfg(str(tmp_path), ["loss.hard_negatives=-1"]))


def test_a_few_steps_with_hard_negatives_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    steps = 30
    module = ClipModule(tiny_cfg(str(tmp_path), [f"trainer.max_steps={steps}", "optim.warmup_steps=3",
                                                 "optim.lr=1e-3", "loss.hard_negatives=2"]))
    batch = square_batch(16)
    negatives = one_word_swaps(batch["caption"], 2, _gen(0))
    texts, owners = flatten_negatives(negatives)
    assert len(texts) == 32  # "a {colour} square on the {side}": every caption has colour and side swaps

    def loss_and_acc():
        with torch.no_grad():
            img, all_txt, scale = module.model(batch["image"], batch["caption"] + texts)
            txt, neg = all_txt[:16], all_txt[16:]
            loss = make_clip_loss()(img, txt, scale, negative_features=neg,
                                    negative_mask=negative_mask(batch["caption"], texts))
            return loss.item(), hard_negative_scores(img, txt, neg, owners)["acc"].mean().item()

    before = loss_and_acc()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=steps, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, steps), batch_size=None),
                val_dataloaders=DataLoader(RepeatBatch(batch, 1), batch_size=None))
    module.eval()
    after = loss_and_acc()
    assert after[0] < before[0] - 0.5 and after[1] > before[1]
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/loss_hard", "train/hard_negative_acc", "val/hard_negative_acc", "val/loss"):
        assert key in logged, key

"""Hard negative images: median-filtered near misses, the loss's extra text->image columns, training with them."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch.utils.data import DataLoader

from _clip_helpers import RepeatBatch, one_thread, square_batch, tiny_cfg
from clip_rank.negatives import median_filter, simplified_copies
from clip_rank.training import ClipModule, image_negative_mask, make_clip_loss
from launch.config import ConfigError

_single_thread = pytest.fixture(autouse=True)(one_thread)

BG, FG = -0.5, 0.8


def _canvas(size: int = 32) -> torch.Tensor:
    return torch.full((1, 3, size, size), BG)


def _square(size: int = 32) -> torch.Tensor:
    img = _canvas(size)
    img[..., 8:24, 8:24] = FG
    return img


def _cross(size: int = 32) -> torch.Tensor:
    img = _canvas(size)
    img[..., 14:18, 6:26] = FG  # arms 4 px thick
    img[..., 6:26, 14:18] = FG
    return img


def test_median_filter_rounds_corners_removes_thin_parts_and_keeps_edges_sharp():
    square = _square()
    out = median_filter(square, 5)
    assert out.shape == square.shape
    assert torch.all(out[..., 8, 8] == BG)  # the corner is cut off ...
    assert torch.all(out[..., 16, 8] == FG) and torch.all(out[..., 8, 16] == FG)  # ... the middle of each edge stays
    assert torch.all(out[..., 16, 16] == FG)
    assert set(out.unique().tolist()) <= set(square.unique().tolist())  # no blur: only the two colours
    assert (out != square).any(1).sum() < 0.1 * 16 * 16
    # arms 4 px thick survive a 5-px window only near the centre; a 9-px window erases them
    arms = median_filter(_cross(), 9)
    assert torch.all(arms[..., 15, 7] == BG) and torch.all(arms[..., 7, 15] == BG)
    flat = _canvas()
    assert torch.equal(median_filter(flat, 7), flat)
    for bad in (1, 4, 0):
        with pytest.raises(ValueError, match="odd"):
            median_filter(square, bad)


def test_simplified_copies_skip_unchanged_images_and_follow_the_generator():
    batch = torch.cat([_square(), _canvas(), _cross(), _square()])
    copies, owners = simplified_copies(batch, 4, sizes=(7,), generator=torch.Generator().manual_seed(0))
    assert sorted(owners) == [0, 2, 3]  # the flat image has no corner to round: no negative
    for copy, o in zip(copies, owners):
        assert torch.equal(copy, median_filter(batch[o:o + 1], 7)[0])
    # num = 1 picks one image; the same generator seed picks the same one
    picks = {tuple(simplified_copies(batch, 1, generator=torch.Generator().manual_seed(s))[1]) for s in range(12)}
    assert len(picks) > 1 and all(len(p) <= 1 for p in picks)
    a = simplified_copies(batch, 2, generator=torch.Generator().manual_seed(5))
    b = simplified_copies(batch, 2, generator=torch.Generator().manual_seed(5))
    assert a[1] == b[1] and torch.equal(a[0], b[0])
    assert simplified_copies(batch, 0)[0].shape[0] == 0
    assert len(simplified_copies(batch, 10, sizes=(7,))[1]) == 3  # at most the batch
    with pytest.raises(ValueError):
        simplified_copies(batch, -1)


def _features(b: int = 6, d: int = 16, n_neg: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return unit(b, d), unit(b, d), unit(n_neg, d), torch.tensor(10.0)


def test_loss_with_negative_images():
    img, txt, neg_img, scale = _features()
    plain = ClipLoss()(img, txt, scale)
    loss_fn = make_clip_loss()
    assert torch.equal(loss_fn(img, txt, scale, negative_image_features=neg_img[:0]), plain)
    mask = image_negative_mask(["a", "b", "a", "c", "d", "e"], [0, 1, 3])  # copies of images 0, 1 and 3
    assert mask.shape == (6, 3)
    assert mask.logical_not().nonzero().tolist() == [[0, 0], [1, 1], [2, 0], [3, 2]]  # caption "a" twice
    got = loss_fn(img, txt, scale, negative_image_features=neg_img, negative_image_mask=mask)
    labels = torch.arange(6)
    extra = (scale * txt @ neg_img.T).masked_fill(mask, float("-inf"))
    expected = (F.cross_entropy(scale * img @ txt.T, labels)  # image->text unchanged
                + F.cross_entropy(torch.cat([scale * txt @ img.T, extra], 1), labels)) / 2
    torch.testing.assert_close(got, expected)
    assert got > plain
    everything = torch.ones(6, 3, dtype=torch.bool)
    torch.testing.assert_close(loss_fn(img, txt, scale, negative_image_features=neg_img,
                                       negative_image_mask=everything), plain)


def test_loss_with_negative_images_under_ddp_keeps_local_rows(monkeypatch):
    """world_size 2, gather faked, not local_loss: the text rows that get negative images are this rank's."""
    img, txt, neg_img, scale = _features(b=8)
    rank, n = 1, 4
    monkeypatch.setattr("open_clip.loss.gather_features", lambda *a, **k: (img, txt))
    loss_fn = make_clip_loss(rank=rank, world_size=2, local_loss=False)
    got = loss_fn(img[n:], txt[n:], scale, negative_image_features=neg_img)
    labels = torch.arange(n) + rank * n
    t2i = F.cross_entropy(torch.cat([scale * txt[n:] @ img.T, scale * txt[n:] @ neg_img.T], 1), labels)
    i2t = F.cross_entropy(scale * img @ txt.T, torch.arange(2 * n))
    torch.testing.assert_close(got, (i2t + t2i) / 2)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_training_with_negative_images(tmp_path):
    batch = square_batch(8)
    torch.manual_seed(0)
    off = ClipModule(tiny_cfg(str(tmp_path)))
    assert off.cfg.loss.image_negatives == 0
    torch.manual_seed(0)
    on = ClipModule(tiny_cfg(str(tmp_path), ["loss.image_negatives=4", "loss.image_negative_sizes=[7]"]))
    with torch.no_grad():
        assert on.training_step(batch, 0) > off.training_step(batch, 0)
        torch.testing.assert_close(on.training_step(batch, 0), on.training_step(batch, 0))  # same step, same draw
    for bad in ("loss.image_negatives=-1", "loss.image_negative_sizes=[4]"):
        with pytest.raises(ConfigError, match="image_negative"):
            ClipModule(tiny_cfg(str(tmp_path), ["loss.image_negatives=2", bad]))

    steps = 30
    torch.manual_seed(0)
    module = ClipModule(tiny_cfg(str(tmp_path), [f"trainer.max_steps={steps}", "optim.warmup_steps=3",
                                                 "optim.lr=1e-3", "loss.image_negatives=8",
                                                 "loss.image_negative_sizes=[7]"]))
    batch = square_batch(16)
    copies, owners = simplified_copies(batch["image"], 16, sizes=(7,))
    assert len(owners) == 16

    def loss_and_acc():
        with torch.no_grad():
            img, txt, scale = module.model(torch.cat([batch["image"], copies]), batch["caption"])
            wins = ((img[:16] - img[16:]) * txt).sum(-1) > 0  # each caption: its image over its rounded copy
            loss = make_clip_loss()(img[:16], txt, scale, negative_image_features=img[16:],
                                    negative_image_mask=image_negative_mask(batch["caption"], owners))
            return loss.item(), wins.float().mean().item()

    before = loss_and_acc()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, steps), batch_size=None))
    module.eval()
    after = loss_and_acc()
    assert after[0] < before[0] - 0.5 and after[1] == 1.0
    assert "train/image_negative_acc" in trainer.callback_metrics

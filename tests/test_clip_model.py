"""CLIP building, loading, export to open_clip's own format, and the ranker."""
from __future__ import annotations

import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _clip_helpers import TINY_ARCH, one_thread, square_batch
from clip_rank import CONFIG_NAME, WEIGHTS_NAME, ClipRanker, PretrainedNotFoundError, build_clip, load_clip, save_clip
from launch.config import ConfigError


_single_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip(arch=TINY_ARCH, pretrained="scratch").eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return save_clip(tiny, str(tmp_path_factory.mktemp("clip") / "export"))


def test_export_loads_in_open_clip_with_identical_features(tiny, exported):
    assert sorted(os.listdir(exported)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    assert not [p for p in os.listdir(os.path.dirname(exported)) if ".tmp" in p]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
    model.eval()
    batch = square_batch(4)
    captions = batch["caption"]
    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in batch["image"]]
    images = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1 for p in pil])
    with torch.no_grad():
        pixels = tiny.prepare_images(images)
        assert torch.equal(model.encode_image(pixels), tiny.clip.encode_image(pixels))  # same weights, same maths
        ours_img = tiny.encode_images(images)
        ours_txt = tiny.encode_texts(captions)
        # open_clip's own transform and tokenizer on the same pictures and captions
        theirs_img = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        theirs_txt = model.encode_text(tokenizer(captions), normalize=True)
    torch.testing.assert_close(ours_txt, theirs_txt, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_img, theirs_img, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.logit_scale, tiny.clip.logit_scale)


def test_export_overwrites_atomically(tiny, tmp_path):
    out = tmp_path / "exp"
    save_clip(tiny, str(out))
    first = os.path.getmtime(out / WEIGHTS_NAME)
    save_clip(tiny, str(out))
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert os.path.getmtime(out / WEIGHTS_NAME) >= first
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_loads_checkpoint_file_and_local_dir(tiny, exported, tmp_path):
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.clip.state_dict().items()}, str(ckpt))
    for model in (build_clip(arch=TINY_ARCH, pretrained=str(ckpt)), build_clip(pretrained=f"local-dir:{exported}"),
                  load_clip(exported)):
        for (name, a), b in zip(tiny.clip.state_dict().items(), model.clip.state_dict().values()):
            assert torch.equal(a, b), name
    scratch = build_clip(arch=TINY_ARCH, pretrained=None)
    assert not torch.equal(scratch.clip.visual.proj, tiny.clip.visual.proj)


def test_missing_pretrained_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "clip.safetensors"
    with pytest.raises(PretrainedNotFoundError, match="nothing at .*nope/clip.safetensors") as info:
        build_clip(arch=TINY_ARCH, pretrained=str(missing))
    assert "\n" not in str(info.value) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(PretrainedNotFoundError, match="never makes"):
        build_clip(name="ViT-B-32", pretrained="openai")  # a tag would be a download
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match=f"has no {CONFIG_NAME}"):
        build_clip(pretrained=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build_clip(name="ViT-Nope", pretrained="scratch")
    with pytest.raises(ConfigError, match="Hugging Face"):
        build_clip(pretrained="hf-hub:laion/whatever")


def test_image_size_override_and_builtin_architecture():
    model = build_clip(name="RN50", pretrained="scratch", image_size=64, context_length=16)
    assert model.image_size == (64, 64) and model.context_length == 16
    assert model.model_cfg["vision_cfg"]["image_size"] == 64
    with torch.no_grad():
        assert model.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 1024)


def test_ranker_scores_are_cosines_and_rank_follows_them(exported):
    ranker = ClipRanker.from_pretrained(exported, batch_size=3)  # batches smaller than the inputs on purpose
    batch = square_batch(7)
    images = batch["image"]
    prompts = batch["caption"]
    scores = ranker.score(prompts, images)
    with torch.no_grad():
        expected = (ranker.model.encode_images(images) * ranker.model.encode_texts(prompts)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1.0 + 1e-5

    one = ranker.score(prompts[0], images)
    assert torch.allclose(one[0], scores[0], atol=1e-6)
    idx, top = ranker.rank(prompts[0], images, k=4)
    assert idx.tolist() == torch.argsort(one, descending=True)[:4].tolist()
    assert torch.equal(top, one[idx]) and bool((top[:-1] >= top[1:]).all())
    # PIL images go through open_clip's own transform and agree with the tensor path
    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in images]
    torch.testing.assert_close(ranker.score(prompts, pil), scores, atol=2e-3, rtol=0)
    assert ranker.rank(prompts[0], list(images))[0].tolist() == torch.argsort(one, descending=True).tolist()

    with pytest.raises(ValueError, match="one per image"):
        ranker.score(prompts[:2], images)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        ranker.score(prompts[0], images * 255)


def _translated(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """out[y, x] = images[y + dy, x + dx], indices clamped at the edges (edge pixels repeated)."""
    h, w = images.shape[-2:]
    ys = (torch.arange(h) + dy).clamp(0, h - 1)
    xs = (torch.arange(w) + dx).clamp(0, w - 1)
    return images[..., ys, :][..., xs]


def test_shift_views_average_the_cosine_over_translated_images(exported):
    from clip_rank.ranker import shift_offsets

    assert shift_offsets(0) == [(0, 0)]
    views = shift_offsets(2)
    assert len(views) == 17 == len(set(views)) and views[0] == (0, 0)
    assert {max(abs(dx), abs(dy)) for dx, dy in views} == {0, 1, 2} and set(views) == {(-x, -y) for x, y in views}
    with pytest.raises(ValueError, match="shifts"):
        shift_offsets(-1)

    plain = ClipRanker.from_pretrained(exported, batch_size=3)
    shifted = ClipRanker.from_pretrained(exported, batch_size=3, shifts=2)
    assert (plain.shifts, shifted.shifts) == (0, 2)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the model's input size
    prompt = "a red square on the left"
    expected = torch.stack([plain.score(prompt, _translated(images, dx, dy)) for dx, dy in views]).mean(0)
    torch.testing.assert_close(shifted.score(prompt, images), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.score(prompt, images, shifts=2), expected, atol=1e-5, rtol=0)  # per call
    torch.testing.assert_close(shifted.score(prompt, images, shifts=0), plain.score(prompt, images))
    assert not torch.allclose(expected, plain.score(prompt, images), atol=1e-4)  # the views do change the score
    order, top = shifted.rank(prompt, images)
    torch.testing.assert_close(top, expected[order], atol=1e-5, rtol=0)
    assert bool((top[:-1] >= top[1:]).all())

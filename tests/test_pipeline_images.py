"""Labelled grids (pipeline/images.py): the bare grid plus a strip with each row's prompt on the left and each image's
CLIP score under it, drawn with PIL's default font (no font file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.images import label_font, labelled_grid, make_grid, wrap_text

H = 64


def _images(n: int, size: int = H) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _label_strip(grid: torch.Tensor, bare: torch.Tensor) -> torch.Tensor:
    return grid[:, :, : grid.shape[2] - bare.shape[2]]


def test_labelled_grid_is_the_bare_grid_plus_the_label_strip_and_score_lines():
    images = _images(8)
    bare = make_grid(images, nrow=4)
    plain = labelled_grid(images, ["a red circle", "a blue square"], nrow=4)
    scored = labelled_grid(images, ["a red circle", "a blue square"], nrow=4, scores=[0.3] * 8)
    strip = plain.shape[2] - bare.shape[2]
    assert strip > 0 and plain.shape[1] == bare.shape[1]  # without scores: only the strip on the left
    assert scored.shape[2] == plain.shape[2] and scored.shape[1] > bare.shape[1]
    per_row = (scored.shape[1] - bare.shape[1]) / 2  # two rows, one score line under each
    assert per_row == int(per_row) and 8 <= per_row <= 20
    # the images themselves are where the bare grid has them, moved right by the strip
    assert torch.equal(plain[:, 2:2 + H, strip + 2:strip + 2 + H], images[0])
    assert plain.dtype == torch.uint8 and plain.shape[0] == 3


def test_every_row_label_and_score_is_drawn():
    images = _images(6)
    grid = labelled_grid(images, ["one", "two", "three"], nrow=2, scores=[0.1, 0.2, 0.3, None, 0.5, 0.6])
    bare = make_grid(images, nrow=2)
    strip = _label_strip(grid, bare)
    row_h = (grid.shape[1] - 2) // 3
    for r in range(3):
        region = strip[:, 2 + r * row_h: 2 + (r + 1) * row_h]
        assert (region < 128).any(), f"row {r}'s label region is blank"
    score_line = grid[:, 2 + H: row_h, strip.shape[2]:]  # under row 0's images
    assert (score_line < 200).any()
    # the image without a score (row 1, column 1) has a blank line under it
    x0 = strip.shape[2] + 2 + (H + 2)
    blank = grid[:, row_h + 2 + H: 2 * row_h, x0:x0 + H]
    assert (blank == 255).all()


def test_a_long_prompt_wraps_and_ends_in_dots_when_it_does_not_fit():
    font = label_font(13)
    words = "a large red circle in the top left corner on a blue background next to a small green cross".split()
    lines = wrap_text(" ".join(words), font, 150)
    assert len(lines) > 2 and all(font.getlength(line) <= 150 for line in lines)
    assert " ".join(lines).split() == words  # nothing lost or reordered
    cut = wrap_text(" ".join(words * 5), font, 150, max_lines=3)
    assert len(cut) == 3 and cut[-1].endswith("...") and font.getlength(cut[-1]) <= 150
    assert wrap_text("x" * 200, font, 60)[0] != "x" * 200  # a word wider than the line is broken


def test_long_and_unicode_prompts_do_not_crash():
    images = _images(4, 32)
    prompts = ["ein grünes Quadrat ✓ 猫 😀 " * 10, "\u200d\u0301 \t\n" + "é" * 300]
    grid = labelled_grid(images, prompts, nrow=2, scores=[1.0, -0.5, 0.25, 0.0])
    assert grid.shape[1] > make_grid(images, nrow=2).shape[1]
    assert labelled_grid(images, ["", "   "], nrow=2).shape[2] > make_grid(images, nrow=2).shape[2]


def test_float_images_and_a_partial_last_row():
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    grid = labelled_grid(images, ["first", "second"], nrow=3)
    bare = make_grid(images, nrow=3)
    assert grid.shape[1] == bare.shape[1] and grid.shape[2] > bare.shape[2]
    with pytest.raises(ValueError, match="need 2 labels"):
        labelled_grid(images, ["only one"], nrow=3)
    with pytest.raises(ValueError, match="5 scores"):
        labelled_grid(images, ["a", "b"], nrow=3, scores=[0.1])


def test_default_font_needs_no_file_and_scales():
    small, large = label_font(10), label_font(24)
    assert small.getbbox("Ag")[3] < large.getbbox("Ag")[3]
    assert np.asarray(small.getmask("A")).size > 0

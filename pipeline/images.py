"""Images out of the pipeline: [-1, 1] tensors to uint8, grids (bare, or labelled with each row's prompt and each
image's CLIP score), PNG files."""
from __future__ import annotations

import math
import unicodedata
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid as _torchvision_grid

from core.files import save_png

__all__ = ["label_font", "labelled_grid", "make_grid", "save_png", "to_uint8", "wrap_text"]

TEXT = (20, 20, 20)
SCORE = (90, 90, 90)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> uint8 (B, 3, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """uint8 or [-1, 1] float images (B, 3, H, W) -> one uint8 (3, H', W') grid on white, ``nrow`` images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if len(images) == 1:  # torchvision returns a lone image unpadded
        return torch.nn.functional.pad(images[0], (padding,) * 4, value=255)
    return _torchvision_grid(images, nrow=max(1, nrow), padding=padding, pad_value=255)


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px: the FreeType build of Pillow (>= 10.1) carries a scalable sans-serif
    (Aileron) and needs no font file; a Pillow without FreeType has only its fixed 11-px bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # no FreeType, or a Pillow older than 10.1 (no size argument)
        return ImageFont.load_default()


_MISSING: dict[tuple[int, str], bool] = {}


def _lacks(font, ch: str) -> bool:
    """Whether ``font`` draws ``ch`` as its missing-glyph box (the same mask as a private-use code point)."""
    key = (id(font), ch)
    if key not in _MISSING:
        def mask(c: str) -> tuple:
            m = font.getmask(c)
            return m.size, bytes(m)
        _MISSING[key] = not ch.isspace() and mask(ch) == mask("\ue000")
    return _MISSING[key]


def _drawable(text: str, font) -> str:
    """One line of text the font can draw: whitespace runs as one space; a character the font lacks as its
    unaccented letters where it has some (PIL's default font is Latin-only: "grün" -> "grun"), else left to the
    font's box; the bitmap font (Pillow without FreeType) only encodes Latin-1."""
    text = " ".join(str(text).split())
    if not isinstance(font, ImageFont.FreeTypeFont):
        return text.encode("latin-1", "replace").decode("latin-1")
    out = []
    for ch in text:
        if ord(ch) > 127 and _lacks(font, ch):
            base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
            ch = base if base and base != ch and not any(_lacks(font, c) for c in base) else ch
        out.append(ch)
    return "".join(out)


def _width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getbbox(text)[2]


def wrap_text(text: str, font, width: int, max_lines: Optional[int] = None) -> list[str]:
    """Greedy word wrap to ``width`` px; a word wider than a line is broken inside; past ``max_lines`` the last
    line ends in "..."."""
    lines: list[str] = []
    line = ""
    for word in _drawable(text, font).split(" "):
        candidate = f"{line} {word}" if line else word
        if _width(font, candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while _width(font, word) > width and len(word) > 1:  # break a word wider than the line
            cut = max(1, max((k for k in range(1, len(word)) if _width(font, word[:k]) <= width), default=1))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        kept = lines[:max(1, max_lines)]
        last = kept[-1]
        while last and _width(font, last + "...") > width:
            last = last[:-1]
        kept[-1] = last.rstrip() + "..."
        lines = kept
    return lines


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent + 1
    return font.getbbox("Ag")[3] + 2


def labelled_grid(images: torch.Tensor, labels: Sequence[str], nrow: int,
                  scores: Optional[Sequence[Optional[float]]] = None, padding: int = 2,
                  font_size: Optional[int] = None, label_width: Optional[int] = None) -> torch.Tensor:
    """A grid of ``nrow`` images per row (uint8 or [-1, 1] floats, (B, 3, H, W)) with row ``i``'s label (its
    prompt) wrapped in a strip to its left and, when ``scores`` are given (one per image, None for none), each
    image's score (3 decimals) under it. Returns a uint8 (3, H', W') tensor, like :func:`make_grid`: the bare grid
    with the label strip added on the left and, with scores, a line of text under each row of images.

    Text is PIL's default font (no font file), sized to the images (10 px for 32-px images, 13 for 64, 24 from
    120 px up); a label too long for its row ends in "...".
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, _, h, w = images.shape
    nrow = max(1, min(nrow, n))  # as make_grid: no empty columns
    rows = math.ceil(n / nrow)
    if len(labels) != rows:
        raise ValueError(f"{rows} rows of {nrow} images need {rows} labels, got {len(labels)}")
    if scores is not None and len(scores) != n:
        raise ValueError(f"{n} images need {n} scores (None for none), got {len(scores)}")
    size = font_size or max(10, min(24, round(h / 5)))
    font = label_font(size)
    line_h = _line_height(font)
    strip = label_width or max(14 * size, 2 * w)
    score_h = line_h + 1 if scores is not None else 0
    row_h = h + padding + score_h
    width = strip + padding + nrow * (w + padding)
    height = padding + rows * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    text_w = strip - 2 * padding - 2
    max_lines = max(1, (row_h - padding) // line_h)
    for r in range(rows):
        top = padding + r * row_h
        lines = wrap_text(labels[r], font, text_w, max_lines)
        y = top + max(0, (h + score_h - len(lines) * line_h) // 2)  # centred on the row
        for line in lines:
            draw.text((padding + 2, y), line, fill=TEXT, font=font)
            y += line_h
        for c in range(nrow):
            i = r * nrow + c
            if i >= n:
                break
            x = strip + padding + c * (w + padding)
            canvas.paste(Image.fromarray(images[i].permute(1, 2, 0).contiguous().numpy()), (x, top))
            if scores is not None and scores[i] is not None:
                text = f"{scores[i]:.3f}"
                tw = _width(font, text)
                draw.text((x + max(0, (w - tw) / 2), top + h + 1), text, fill=SCORE, font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)

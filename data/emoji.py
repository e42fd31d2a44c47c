"""A real image set that installs offline: Noto Color Emoji rendered with Pillow, captioned with the emoji's name.

Source: the Debian package ``fonts-noto-color-emoji`` (OFL; a CBDT bitmap font whose only size is 109) and the
English names of the PyPI package ``emoji`` (``EMOJI_DATA[e]["en"]``, colons stripped, underscores -> spaces). Every
fully-qualified emoji and every component (skin tones, hair styles) of the name table is rendered once, in colour,
centred in a fixed square cell on a white background (the cell keeps the font's relative sizes: a "small square"
stays small), and downscaled with Lanczos antialiasing. Glyphs the font lacks render blank and are skipped; a
sequence the font cannot join (it shapes into several glyphs side by side) is skipped too. The minimally-qualified
and unqualified spellings are left out: they render the same glyph as their fully-qualified form.

Any TrueType font works (``font_path``, ``font_size``): the tests use DejaVuSans, whose few symbols render black.

:func:`data.prepare.prepare_emoji_folder` writes the same images as a folder of PNG files with same-stem ``.txt``
captions (``python -m data prepare emoji --as-folder``): the input of ``python -m data prepare folder``, as a user's
own images are, which the emoji recipe (``python -m demo emoji``, docs/emoji.md) starts from.
"""
from __future__ import annotations

import io
import os
import random
from typing import Optional

from PIL import Image, ImageDraw, ImageFont, features

from data.errors import DataError

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the only pixel size of Noto Color Emoji's CBDT bitmaps
INSTALL_FONT = "apt-get install fonts-noto-color-emoji"
INSTALL_NAMES = "pip install -e .[emoji]"
MAX_GLYPH_WIDTH = 1.5  # ink wider than this many cell sides: the sequence fell apart into several glyphs
SKIP_REASONS = ("blank", "not_single_glyph")


def load_font(path: Optional[str] = None, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The font at ``path`` (default: Noto Color Emoji) at ``size`` px; a missing or unusable font is a DataError."""
    path = path or DEFAULT_FONT
    if not os.path.isfile(path):
        raise DataError(f"emoji font not found: {path}; install Noto Color Emoji with `{INSTALL_FONT}` or pass "
                        "--font PATH")
    try:
        return ImageFont.truetype(path, size)
    except OSError as exc:  # CBDT fonts refuse any other size ("invalid pixel size")
        raise DataError(f"cannot load font {path} at size {size}: {exc} (Noto Color Emoji only has size "
                        f"{FONT_SIZE})") from None


def caption_of(name: str) -> str:
    """``':AB_button_(blood_type):'`` -> ``'AB button (blood type)'``."""
    return " ".join(name.strip().strip(":").replace("_", " ").split())


def emoji_names() -> tuple[dict[str, str], str]:
    """({emoji: caption} for fully-qualified emoji and components, the ``emoji`` package's version)."""
    try:
        import emoji
    except ImportError:
        raise DataError(f"the 'emoji' package (emoji names) is not installed: {INSTALL_NAMES}") from None
    keep = (emoji.STATUS["component"], emoji.STATUS["fully_qualified"])
    names = {e: caption_of(d["en"]) for e, d in emoji.EMOJI_DATA.items() if d.get("status") in keep and d.get("en")}
    return names, getattr(emoji, "__version__", "unknown")


def cell_side(font: ImageFont.FreeTypeFont) -> int:
    """The square every glyph is centred in: the font's line height (136 px for Noto Color Emoji at 109)."""
    ascent, descent = font.getmetrics()
    return max(1, ascent + descent)


def render(text: str, font: ImageFont.FreeTypeFont, resolution: int = 64) -> tuple[Optional[Image.Image], str]:
    """(RGB image ``resolution``², "") or (None, reason) with reason in :data:`SKIP_REASONS`.

    The glyph is drawn in its own colours (black for a plain font) on a transparent canvas, its ink box (alpha > 0)
    is centred in a white square of the font's cell side (enlarged if the ink is bigger), and the square is
    downscaled with Lanczos.
    """
    cell = cell_side(font)
    x0, y0, x1, y1 = font.getbbox(text)
    pad = 4
    canvas = Image.new("RGBA", (max(1, x1 - x0) + 2 * pad, max(1, y1 - y0) + 2 * pad), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((pad - x0, pad - y0), text, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    ink = canvas.getchannel("A").getbbox()
    if ink is None:
        return None, "blank"
    w, h = ink[2] - ink[0], ink[3] - ink[1]
    if w > MAX_GLYPH_WIDTH * cell:
        return None, "not_single_glyph"
    side = max(cell, w, h)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(canvas.crop(ink), ((side - w) // 2, (side - h) // 2))
    image = square.convert("RGB")
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image, ""


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def codepoints(text: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in text)


def layout_engine() -> str:
    """'raqm' joins ZWJ sequences, flags and skin tones into one glyph; 'basic' cannot (they are then skipped)."""
    return "raqm" if features.check("raqm") else "basic"


def render_split(names: dict[str, str], font: ImageFont.FreeTypeFont, resolution: int, seed: int,
                 val_fraction: float, font_path: str
                 ) -> tuple[list[tuple[str, Image.Image]], dict[str, list[str]], dict[str, list[int]]]:
    """Render every emoji of ``names`` in code point order and split the kept ones by a ``seed``-ed permutation
    whose first ``val_fraction`` goes to val. Returns (kept (text, image) pairs, skipped names by reason,
    {"val": indices, "train": indices} into kept)."""
    kept: list[tuple[str, Image.Image]] = []
    skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
    for text in sorted(names):
        image, reason = render(text, font, resolution)
        if image is None:
            skipped[reason].append(names[text])
        else:
            kept.append((text, image))
    if len(kept) < 2:
        raise DataError(f"only {len(kept)} of {len(names)} emoji rendered with {font_path}; need >= 2")
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_val = min(len(kept) - 1, max(1, round(len(kept) * val_fraction)))
    return kept, skipped, {"val": order[:n_val], "train": order[n_val:]}


def file_stem(text: str) -> str:
    """An emoji's file name without extension: its code points in hex joined by "-" (``1F468-200D-1F469``)."""
    return "-".join(f"{ord(c):04X}" for c in text)

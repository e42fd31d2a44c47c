"""The synthetic "shapes" benchmark: one coloured shape on a coloured background, with an exact caption.

Spec (fixed; recorded in every manifest): an 8-colour palette, 4 shapes (circle, square, triangle with apex up,
cross = plus sign with arms 1/3 wide), 2 sizes (bounding box 1/4 or 1/2 of the canvas side), 5 positions (center or
a quadrant's center), object colour != background colour, jitter of +-2 px (at 64 px) in position and +-8% in size.
The jittered object is kept inside the canvas. Edges are anti-aliased (4x4 supersampling). A fixed, seeded 10% of
the 2240 (shape, color, size, position, background) combinations never appears in train and only in val.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from data.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.25, "large": 0.5}  # bounding-box side / canvas side
POSITIONS: dict[str, tuple[float, float]] = {  # object center (x, y) / canvas side
    "center": (0.5, 0.5), "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
CAPTION_TEMPLATE = "a {size} {color} {shape} in the {position} on a {background} background"
POSITION_JITTER_PX = 2.0  # at 64 px; scaled with the resolution
SIZE_JITTER = 0.08
SUPERSAMPLE = 4
HELDOUT_FRACTION = 0.1
HELDOUT_SEED = 0  # fixed: every shapes set holds out the same combinations, so results compare across sets
ATTRIBUTES = ("shape", "color", "size", "position", "background")

_CAPTION_RX = re.compile(
    r"^an? (?P<size>{})\s+(?P<color>{})\s+(?P<shape>{})\s+in the (?P<position>{})\s+on an? (?P<background>{})"
    r"\s+background\.?$".format(*("|".join(map(re.escape, v)) for v in (SIZES, PALETTE, SHAPES, POSITIONS, PALETTE))))


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", PALETTE), ("size", SIZES), ("position", POSITIONS),
                              ("background", PALETTE)):
            if getattr(self, name) not in allowed:
                raise DataError(f"unknown {name} '{getattr(self, name)}'; choose one of: {', '.join(allowed)}")
        if self.color == self.background:
            raise DataError(f"object and background colour are both '{self.color}'")

    @property
    def combo(self) -> tuple[str, str, str, str, str]:
        return (self.shape, self.color, self.size, self.position, self.background)

    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(**asdict(self))


def parse_caption(caption: str) -> ShapeSpec:
    """A shapes caption -> its ShapeSpec; anything else raises DataError."""
    m = _CAPTION_RX.match(" ".join(str(caption).lower().split()))
    if m is None:
        raise DataError(f"not a shapes caption ('{CAPTION_TEMPLATE}'): {caption!r}")
    try:
        return ShapeSpec(**m.groupdict())
    except DataError as exc:
        raise DataError(f"{exc}: {caption!r}") from None


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every valid (shape, color, size, position, background), in a fixed order (2240 of them)."""
    return [(s, c, z, p, b) for s in SHAPES for c in PALETTE for z in SIZES for p in POSITIONS for b in PALETTE
            if c != b]


def heldout_combinations(seed: int = HELDOUT_SEED, fraction: float = HELDOUT_FRACTION) -> list[tuple]:
    """The fixed, seeded share of combinations kept out of train (sorted)."""
    combos = all_combinations()
    return sorted(random.Random(seed).sample(combos, round(fraction * len(combos))))


# ---- rendering ------------------------------------------------------------------------------------------------
def shape_coverage(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's box coordinates (u, v in [-1, 1], v pointing down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":  # apex at the top (v = -1), base at the bottom (v = 1)
        return (av <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "cross":
        return ((au <= 1 / 3) & (av <= 1.0)) | ((av <= 1 / 3) & (au <= 1.0))
    raise DataError(f"unknown shape '{shape}'")


@lru_cache(maxsize=8)
def _subpixel_offsets(ss: int) -> np.ndarray:
    return (np.arange(ss) + 0.5) / ss


def rasterize(shape: str, cx: float, cy: float, side: float, resolution: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1] of ``shape`` centred at (cx, cy) px with box side ``side``."""
    cov = np.zeros((resolution, resolution), np.float32)
    half = side / 2.0
    x0, x1 = max(0, int(np.floor(cx - half)) - 1), min(resolution, int(np.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(np.floor(cy - half)) - 1), min(resolution, int(np.ceil(cy + half)) + 1)
    if x1 <= x0 or y1 <= y0:
        return cov
    offs = _subpixel_offsets(SUPERSAMPLE)
    xs = ((np.arange(x0, x1)[:, None] + offs[None, :]).ravel() - cx) / half
    ys = ((np.arange(y0, y1)[:, None] + offs[None, :]).ravel() - cy) / half
    inside = shape_coverage(shape, xs[None, :], ys[:, None]).astype(np.float32)
    h, w = y1 - y0, x1 - x0
    cov[y0:y1, x0:x1] = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def layout(spec: ShapeSpec, resolution: int, rng: Optional[np.random.Generator] = None) -> tuple[float, float, float]:
    """(cx, cy, side) in pixels, jittered with ``rng`` (None: no jitter), the object kept inside the canvas."""
    side = SIZES[spec.size] * resolution
    fx, fy = POSITIONS[spec.position]
    cx, cy = fx * resolution, fy * resolution
    if rng is not None:
        side *= 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        jitter = POSITION_JITTER_PX * resolution / 64.0
        cx += rng.uniform(-jitter, jitter)
        cy += rng.uniform(-jitter, jitter)
    half = side / 2.0
    cx, cy = min(max(cx, half), resolution - half), min(max(cy, half), resolution - half)
    return cx, cy, side


def render(spec: ShapeSpec, resolution: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The image of ``spec`` as uint8 (H, W, 3); ``rng`` draws the jitter (None: exact nominal layout)."""
    cx, cy, side = layout(spec, resolution, rng)
    cov = rasterize(spec.shape, cx, cy, side, resolution)[..., None]
    bg = np.asarray(PALETTE[spec.background], np.float32)
    fg = np.asarray(PALETTE[spec.color], np.float32)
    return np.rint(bg + (fg - bg) * cov).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_spec(split: str, index: int, seed: int, seen: list[tuple], heldout: list[tuple]) -> tuple[ShapeSpec, bool, np.random.Generator]:
    """The spec of sample ``index`` of ``split``: a function of (seed, split, index) only, so shards are independent.

    Train draws uniformly from the seen combinations; val alternates held-out and seen combinations.
    """
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    is_heldout = split != "train" and index % 2 == 0 and bool(heldout)
    pool = heldout if is_heldout else seen
    return ShapeSpec(*pool[int(rng.integers(len(pool)))]), is_heldout, rng


def make_sample(split: str, index: int, seed: int, resolution: int, seen: list[tuple],
                heldout: list[tuple]) -> dict[str, Any]:
    spec, is_heldout, rng = sample_spec(split, index, seed, seen, heldout)
    meta = dict(asdict(spec), heldout=is_heldout)
    return {"__key__": f"{split}_{index:08d}", "png": png_bytes(render(spec, resolution, rng)),
            "txt": spec.caption(), "json": json.dumps(meta, sort_keys=True)}


def spec_dict() -> dict[str, Any]:
    return {"palette": {k: list(v) for k, v in PALETTE.items()}, "shapes": list(SHAPES), "sizes": SIZES,
            "positions": {k: list(v) for k, v in POSITIONS.items()}, "caption_template": CAPTION_TEMPLATE,
            "position_jitter_px_at_64": POSITION_JITTER_PX, "size_jitter": SIZE_JITTER,
            "supersample": SUPERSAMPLE, "heldout_fraction": HELDOUT_FRACTION}


def load_manifest(path_or_dir: str) -> dict[str, Any]:
    path = os.path.join(path_or_dir, "manifest.json") if os.path.isdir(path_or_dir) else path_or_dir
    if not os.path.isfile(path):
        raise DataError(f"no shapes manifest at {path}: run `python -m data prepare shapes --out DIR` first")
    from core.files import read_json

    return read_json(path)


def val_prompts(manifest: Union[str, dict, None] = None, n_seen: int = 8, n_heldout: int = 8,
                seed: int = 0) -> list[dict[str, Any]]:
    """Prompts for demos and evaluation: ``n_seen`` train combinations then ``n_heldout`` held-out ones.

    ``manifest`` is a manifest dict, its path or its folder (None: the default held-out split). Each item is
    ``{"caption", "heldout", **spec}``; the choice is seeded, so the same call gives the same prompts.
    """
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    held = [tuple(c) for c in manifest["heldout"]] if manifest else heldout_combinations()
    held_set = set(held)
    seen = [c for c in all_combinations() if c not in held_set]
    rng = random.Random(seed)
    if n_seen > len(seen) or n_heldout > len(held):
        raise DataError(f"asked for {n_seen} seen / {n_heldout} held-out prompts; there are {len(seen)} / {len(held)}")
    out = []
    for combos, flag in ((rng.sample(seen, n_seen), False), (rng.sample(held, n_heldout), True)):
        for c in combos:
            spec = ShapeSpec(*c)
            out.append(dict(asdict(spec), caption=spec.caption(), heldout=flag))
    return out

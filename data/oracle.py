"""The shapes oracle: reads (shape, color, size, position, background) back from pixels, no learned model.

Background: the palette colour nearest to the median border pixel. Object colour: the most frequent palette
colour among pixels that are close to a palette colour and far from the background. Object mask: each pixel is
projected on the background -> object colour segment; coverage > 1/2 is inside (the anti-aliasing / blur midpoint),
isolated pixels are dropped. Size: bounding-box side vs 3/8 of the canvas. Position: the anchor nearest to the box
center. Shape: the template (rasterised in the detected box) with the best soft IoU with the coverage map.
Robust to the mild blur and colour noise of a VQGAN reconstruction.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from data.errors import DataError
from data.shapes import ATTRIBUTES, PALETTE, POSITIONS, SHAPES, SIZES, parse_caption, rasterize

_NAMES = list(PALETTE)
_COLORS = np.asarray([PALETTE[n] for n in _NAMES], np.float32)
_PURE = 60.0  # a pixel this close to a palette colour counts as that colour
_FAR = 60.0  # ... and this far from the background is a candidate object pixel


def to_array(image: Union[Image.Image, np.ndarray, torch.Tensor]) -> np.ndarray:
    """PIL image, uint8 array/tensor ((H,W,3) or (3,H,W)) or float tensor in [-1, 1] -> float32 (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype != torch.uint8:
            t = ((t.float().clamp(-1, 1) + 1) * 127.5)
        arr = t.numpy().astype(np.float32)
    else:
        arr = np.asarray(image).astype(np.float32)
        if np.asarray(image).dtype != np.uint8:
            arr = (np.clip(arr, -1, 1) + 1) * 127.5
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(f"expected an RGB image (H,W,3) or (3,H,W), got shape {tuple(arr.shape)}")
    return arr


def _nearest(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(colors[..., None, :] - _COLORS, axis=-1)
    return d.argmin(-1), d.min(-1)


def _denoise(mask: np.ndarray) -> np.ndarray:
    """Drop pixels with fewer than 2 of their 8 neighbours inside (specks of a reconstruction)."""
    p = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    n = sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return mask & (n >= 2)


def predict(image: Union[Image.Image, np.ndarray, torch.Tensor]) -> dict[str, Optional[str]]:
    """The attributes read from ``image``; object attributes are None when no object is found."""
    img = to_array(image)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_idx = int(_nearest(np.median(border, axis=0))[0])
    out: dict[str, Optional[str]] = {"background": _NAMES[bg_idx], "shape": None, "color": None, "size": None,
                                     "position": None}
    bg = _COLORS[bg_idx]
    label, dist = _nearest(img)
    cand = (dist < _PURE) & (label != bg_idx) & (np.linalg.norm(img - bg, axis=-1) > _FAR)
    if not cand.any():
        return out
    fg_idx = Counter(label[cand].tolist()).most_common(1)[0][0]
    out["color"] = _NAMES[fg_idx]
    axis = _COLORS[fg_idx] - bg
    cov = np.clip(((img - bg) @ axis) / float(axis @ axis), 0.0, 1.0)
    mask = _denoise(cov > 0.5)
    if not mask.any():
        return out
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = float(max(x1 - x0, y1 - y0))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    out["size"] = "large" if side / w > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * w - cx) ** 2 + (POSITIONS[p][1] * h - cy) ** 2)
    soft = np.where(_denoise(cov > 0.25), cov, 0.0)

    def iou(shape: str) -> float:
        tmpl = rasterize(shape, cx, cy, side, max(h, w))[:h, :w]
        return float(np.minimum(tmpl, soft).sum() / max(np.maximum(tmpl, soft).sum(), 1e-6))

    out["shape"] = max(SHAPES, key=iou)
    return out


def score(caption: str, image: Union[Image.Image, np.ndarray, torch.Tensor]) -> dict[str, bool]:
    """Per-attribute correctness of ``image`` for a shapes ``caption``, plus "all" (every attribute right)."""
    want = parse_caption(caption)
    got = predict(image)
    result = {a: got[a] == getattr(want, a) for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result


def evaluate(captions: Sequence[str], images: Any) -> dict[str, float]:
    """Mean accuracy per attribute and all-correct over pairs (images: a list or a (B,3,H,W) batch)."""
    if len(captions) == 0:
        raise DataError("evaluate() needs at least one caption/image pair")
    if len(captions) != len(images):
        raise DataError(f"{len(captions)} captions but {len(images)} images")
    totals = Counter()
    for caption, image in zip(captions, images):
        totals.update({k: int(v) for k, v in score(caption, image).items()})
    return {k: totals[k] / len(captions) for k in (*ATTRIBUTES, "all")}

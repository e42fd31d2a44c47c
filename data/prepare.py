"""Shard tools behind ``python -m data``: the shapes set, the Noto emoji set, a folder of captioned images, and
shard inspection.

Every writer here is resumable: a shard is written under a temporary name and renamed when complete, the sample ->
shard assignment is a pure function of the inputs, and a rerun skips the shards that already exist.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from PIL import Image

from data import emoji as emoji_set
from data.decode import (CODES_EXT, IMAGE_EXTS, SKIP_KINDS, SkipCounter, decode_caption, decode_codes, load_image,
                         open_image, to_rgb)
from core.files import atomic_file, read_json
from data.errors import DataError
from data.shapes import HELDOUT_SEED, all_combinations, heldout_combinations, make_sample, spec_dict
from data.shards import ShardWriter, expand_pattern, read_stages, shard_name, write_empty_shard

Progress = Optional[Callable[[str], None]]


def _write_json(path: str, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")


def _write_shards(out_dir: str, n_items: int, shard_size: int, make: Callable[[int], Optional[dict]],
                  progress: Progress = None) -> tuple[list[str], int]:
    """Shard i holds items [i*K, (i+1)*K); finished shards are skipped. Returns (shard names, shards written)."""
    names, written = [], 0
    os.makedirs(out_dir, exist_ok=True)
    for i in range(math.ceil(n_items / shard_size)):
        names.append(shard_name(i))
        if os.path.exists(os.path.join(out_dir, names[-1])):
            continue
        with ShardWriter(out_dir, shard_size=shard_size, start_index=i) as writer:
            for j in range(i * shard_size, min(n_items, (i + 1) * shard_size)):
                sample = make(j)
                if sample is not None:
                    writer.write(sample)
        if not writer.written:  # every item of the shard was unusable: an empty shard marks it done
            write_empty_shard(writer.path(i))
        written += 1
        if progress:
            progress(f"{out_dir}/{names[-1]}")
    return names, written


def _check_split_args(val_fraction: float, resolution: int, shard_size: int) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if resolution < 16:
        raise DataError(f"--resolution must be >= 16, got {resolution}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")


MANIFEST, PENDING = "manifest.json", ".prepare.json"  # PENDING holds the settings while shards are being written


def _refuse_other_settings(out: str, settings: dict, what: str, files: tuple[str, ...] = (MANIFEST, PENDING)) -> None:
    """A rerun must not mix shards (or images) made with other settings."""
    for path in (os.path.join(out, name) for name in files):
        if os.path.exists(path):
            old = read_json(path).get("settings")
            if old != settings:
                raise DataError(f"{out} holds {what} made with other settings ({old}); choose another --out")


def _write_splits(out: str, manifest: dict, counts: dict, shard_size: int, make: Callable[[str, int], dict],
                  progress: Progress) -> dict:
    """Write OUT/train and OUT/val (``make(split, j)`` -> sample j), then manifest.json last: its presence says the
    set is complete. Removes the pending marker and returns the manifest."""
    shards = {}
    for split in ("train", "val"):
        shards[split], _ = _write_shards(os.path.join(out, split), counts[split], shard_size,
                                         functools.partial(make, split), progress)
        first, last = shards[split][0][:-4], shards[split][-1][:-4]
        manifest["splits"][split] = f"{split}/{{{first}..{last}}}.tar" if first != last else f"{split}/{first}.tar"
    manifest["shards"] = shards
    _write_json(os.path.join(out, MANIFEST), manifest)
    os.remove(os.path.join(out, PENDING))
    return manifest


def prepare_shapes(out: str, num_samples: int, resolution: int = 64, seed: int = 0, shard_size: int = 1000,
                   val_fraction: float = 0.1, heldout_seed: int = HELDOUT_SEED, progress: Progress = None) -> dict:
    """Write the shapes set: OUT/train/*.tar, OUT/val/*.tar, OUT/manifest.json. Returns the manifest.

    manifest.json is written last, so its presence means the set is complete; a rerun skips finished shards.
    """
    if num_samples < 2:
        raise DataError(f"--num-samples must be >= 2, got {num_samples}")
    _check_split_args(val_fraction, resolution, shard_size)
    n_val = min(num_samples - 1, max(1, round(num_samples * val_fraction)))
    counts = {"train": num_samples - n_val, "val": n_val, "val_heldout": (n_val + 1) // 2}
    held = heldout_combinations(heldout_seed)
    held_set = set(held)
    seen = [c for c in all_combinations() if c not in held_set]
    settings = {"seed": seed, "resolution": resolution, "num_samples": num_samples, "shard_size": shard_size,
                "val_fraction": val_fraction, "heldout_seed": heldout_seed}
    _refuse_other_settings(out, settings, "a shapes set")
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, PENDING), {"settings": settings})
    manifest: dict[str, Any] = {
        "name": "shapes", "version": 1, "settings": settings, "counts": counts, "spec": spec_dict(),
        "num_combinations": len(seen) + len(held), "heldout": [list(c) for c in held], "splits": {},
    }
    def make(split: str, j: int) -> dict:
        return make_sample(split, j, seed, resolution, seen, held)

    return _write_splits(out, manifest, counts, shard_size, make, progress)


# ---- Noto emoji -------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _emoji_start(val_fraction: float, resolution: int, seed: int, font: Optional[str], font_size: int,
                 names: Optional[dict[str, str]], shard_size: int = 1
                 ) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    """Checks the arguments and loads the font (first: a missing font is the likeliest problem) and the names.
    Returns (font path, font, names, the settings that identify the rendered set)."""
    _check_split_args(val_fraction, resolution, shard_size)
    font_path = font or emoji_set.DEFAULT_FONT
    loaded = emoji_set.load_font(font_path, font_size)
    names_version = "custom"
    if names is None:
        names, names_version = emoji_set.emoji_names()
    table = json.dumps(sorted(names.items()), ensure_ascii=False).encode("utf-8")
    settings = {"seed": seed, "resolution": resolution, "val_fraction": val_fraction,
                "font": os.path.abspath(font_path), "font_sha256": _sha256(font_path), "font_size": font_size,
                "names": names_version, "names_sha256": hashlib.sha256(table).hexdigest(),
                "layout": emoji_set.layout_engine()}
    return font_path, loaded, names, settings


def prepare_emoji(out: str, resolution: int = 64, val_fraction: float = 0.05, seed: int = 0, shard_size: int = 1000,
                  font: Optional[str] = None, font_size: int = emoji_set.FONT_SIZE,
                  names: Optional[dict[str, str]] = None, progress: Progress = None) -> dict:
    """Render every emoji of ``names`` (default: the ``emoji`` package's table) with ``font`` (default: Noto Color
    Emoji) into OUT/train/*.tar, OUT/val/*.tar and OUT/manifest.json (written last). Returns the manifest.

    Blank renders (glyphs the font lacks) and sequences that fall apart into several glyphs are skipped and counted.
    The kept emoji (in code point order) are split by a ``seed``-ed permutation: its first ``val_fraction`` goes to
    val; both splits are written in permutation order. A rerun skips finished shards.
    """
    font_path, loaded, names, settings = _emoji_start(val_fraction, resolution, seed, font, font_size, names,
                                                      shard_size)
    settings["shard_size"] = shard_size
    _refuse_other_settings(out, settings, "an emoji set")
    rendered, skipped, split_items = emoji_set.render_split(names, loaded, resolution, seed, val_fraction, font_path)
    kept = [(text, emoji_set.png_bytes(image)) for text, image in rendered]
    n_val = len(split_items["val"])
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, PENDING), {"settings": settings})
    manifest: dict[str, Any] = {
        "name": "emoji", "version": 1, "settings": settings, "candidates": len(names),
        "counts": {"train": len(split_items["train"]), "val": n_val},
        "skipped": {reason: len(v) for reason, v in skipped.items()}, "skipped_names": skipped, "splits": {},
    }
    def make(split: str, j: int) -> dict:
        text, png = kept[split_items[split][j]]
        meta = {"emoji": text, "codepoints": emoji_set.codepoints(text)}
        return {"__key__": f"{split}_{j:06d}", "png": png, "txt": names[text],
                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True)}

    return _write_splits(out, manifest, {k: len(v) for k, v in split_items.items()}, shard_size, make, progress)


EMOJI_FOLDER_MANIFEST = "emoji.json"


def prepare_emoji_folder(out: str, resolution: int = 64, val_fraction: float = 0.05, seed: int = 0,
                         font: Optional[str] = None, font_size: int = emoji_set.FONT_SIZE,
                         names: Optional[dict[str, str]] = None, progress: Progress = None) -> dict:
    """The images of :func:`prepare_emoji` (same renders, skips and split) as a folder of captioned images, the
    layout :func:`prepare_folder` reads: OUT/train/STEM.png + OUT/train/STEM.txt (its caption) and the same under
    OUT/val/, STEM being the code points (:func:`data.emoji.file_stem`), then OUT/emoji.json (settings, counts,
    skipped names) last. A rerun with the same settings finds OUT/emoji.json and returns it; other settings are
    refused. Returns the manifest."""
    font_path, loaded, names, settings = _emoji_start(val_fraction, resolution, seed, font, font_size, names)
    manifest_path = os.path.join(out, EMOJI_FOLDER_MANIFEST)
    _refuse_other_settings(out, settings, "an emoji folder", (EMOJI_FOLDER_MANIFEST,))
    if os.path.isfile(manifest_path):
        return read_json(manifest_path)
    kept, skipped, splits = emoji_set.render_split(names, loaded, resolution, seed, val_fraction, font_path)
    for split, items in splits.items():
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        for j in items:
            text, image = kept[j]
            stem = os.path.join(folder, emoji_set.file_stem(text))
            image.save(stem + ".png", format="PNG", compress_level=6)
            with open(stem + ".txt", "w", encoding="utf-8") as fh:
                fh.write(names[text] + "\n")
        if progress:
            progress(f"{len(items)} images + captions in {folder}")
    manifest = {"name": "emoji", "settings": settings, "candidates": len(names),
                "counts": {k: len(v) for k, v in splits.items()},
                "skipped": {reason: len(v) for reason, v in skipped.items()}, "skipped_names": skipped}
    _write_json(manifest_path, manifest)  # last: its presence says the folder is complete
    return manifest


# ---- a folder of captioned images ------------------------------------------------------------------------------
def _read_captions(path: str, src: str) -> dict[str, str]:
    """CSV (columns path,caption; a header naming them is optional) or JSONL ({"path", "caption"}) -> relpath->caption."""
    if not os.path.isfile(path):
        raise DataError(f"captions file not found: {path}")
    with open(path, "rb") as raw:
        data = raw.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the captions file as "
                        "UTF-8") from None
    rows: list[tuple[str, str]] = []
    with io.StringIO(text, newline="") as fh:
        if path.lower().endswith((".jsonl", ".json")):
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                        rows.append((str(obj["path"]), str(obj["caption"])))
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{n}: expected a JSON object with 'path' and 'caption'") from None
        else:
            table = [r for r in csv.reader(fh) if r]
            cols = (0, 1)
            if table and {"path", "caption"} <= {c.strip().lower() for c in table[0]}:
                header = [c.strip().lower() for c in table.pop(0)]
                cols = (header.index("path"), header.index("caption"))
            for n, r in enumerate(table, 1):
                if len(r) <= max(cols):
                    raise DataError(f"{path}: row {n} has {len(r)} column(s); expected path,caption")
                rows.append((r[cols[0]], r[cols[1]]))
    out = {}
    for p, caption in rows:
        rel = os.path.relpath(p, src) if os.path.isabs(p) else os.path.normpath(p)
        out[rel] = caption
    return out


def _list_images(src: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                found.append(os.path.relpath(os.path.join(root, f), src))
    return found


def _image_member(path: str) -> tuple[str, bytes]:
    """(extension, bytes): JPEG/PNG/WebP stored as they are (after a decode check), others re-encoded as PNG."""
    with open(path, "rb") as fh:
        data = fh.read()
    img = open_image(data)
    fmt = img.format
    img.load()
    if fmt in ("JPEG", "PNG", "WEBP"):
        return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt], data
    buf = io.BytesIO()
    (img if img.mode in ("RGB", "RGBA", "L", "LA") else to_rgb(img)).save(buf, format="PNG")
    return "png", buf.getvalue()


def prepare_folder(src: str, out: str, captions: Optional[str] = None, shard_size: int = 1000,
                   progress: Progress = None, skipped: Progress = None) -> dict:
    """Images under ``src`` with a same-stem ``.txt`` caption (or captions from a CSV/JSONL) -> shards in ``out``.

    An image that does not decode (or is over PIL's pixel limit) and a ``.txt`` caption that is not UTF-8 are
    skipped: listed in the summary (``unreadable_images``, ``unreadable_captions``) and passed to ``skipped`` one
    file at a time."""
    if not os.path.isdir(src):
        raise DataError(f"--src {src} is not a folder")
    table = _read_captions(captions, src) if captions else None
    pairs, no_caption, bad_captions = [], 0, []
    for rel in _list_images(src):
        if table is not None:
            caption = table.get(os.path.normpath(rel))
        else:
            txt_rel = os.path.splitext(rel)[0] + ".txt"
            txt = os.path.join(src, txt_rel)
            caption = None
            if os.path.isfile(txt):
                with open(txt, "rb") as fh:
                    raw = fh.read()
                try:
                    caption = decode_caption(raw)
                except DataError as exc:  # skipped and counted, as training skips such a caption in a shard
                    bad_captions.append(txt_rel)
                    if skipped:
                        skipped(f"{os.path.join(src, txt_rel)}: {exc}")
                    continue
        if caption is None:
            no_caption += 1
        else:
            pairs.append((rel, caption))
    if not pairs:
        raise DataError(f"no captioned image found under {src} ({no_caption} image(s) without caption"
                        + (f", {len(bad_captions)} caption(s) not UTF-8, e.g. {bad_captions[0]}" if bad_captions
                           else "") + ")")
    bad: list[str] = []

    def make(j: int) -> Optional[dict]:
        rel, caption = pairs[j]
        try:
            ext, data = _image_member(os.path.join(src, rel))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append(rel)
            if skipped:
                skipped(f"{os.path.join(src, rel)}: {str(exc).splitlines()[0][:160] or type(exc).__name__}")
            return None
        return {"__key__": f"{j:09d}", ext: data, "txt": caption, "json": json.dumps({"source": rel})}

    names, written = _write_shards(out, len(pairs), shard_size, make, progress)
    return {"out": out, "shards": len(names), "shards_written": written, "samples": len(pairs) - len(bad),
            "images_without_caption": no_caption, "unreadable_images": bad, "unreadable_captions": bad_captions,
            "missing_images": sorted(set(table) - set(map(os.path.normpath, _list_images(src)))) if table else []}


# ---- inspection ------------------------------------------------------------------------------------------------
def _tar_samples(url: str, counter: SkipCounter) -> Iterable[dict]:
    import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList([url]), *read_stages(counter))


def _codes_manifest(urls: list[str]) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """(codebook size, grid) from the manifest.json a VQGAN encoder writes beside code shards (or one folder up),
    else (None, None)."""
    if not urls or "://" in urls[0] or urls[0].startswith("pipe:"):
        return None, None
    folder = os.path.dirname(os.path.abspath(urls[0]))
    for path in (os.path.join(folder, MANIFEST), os.path.join(os.path.dirname(folder), MANIFEST)):
        if os.path.isfile(path):
            man = read_json(path)
            size, grid = man.get("codebook_size"), man.get("grid")
            if isinstance(size, int) or (isinstance(grid, list) and len(grid) == 2):
                return (size if isinstance(size, int) else None,
                        tuple(int(g) for g in grid) if isinstance(grid, list) and len(grid) == 2 else None)
    return None, None


def inspect_shards(pattern: str, caption_key: str = "txt") -> dict:
    """One summary dict of the shards matching ``pattern``: counts, extensions, corrupt and uncaptioned samples.

    A sample is corrupt where training would skip it: a caption that is not UTF-8, an image that does not decode
    (or is over PIL's pixel limit), an unreadable codes array (or, with a code-shard manifest.json beside the shards,
    ids outside its codebook or another grid), or no image/codes member."""
    urls = expand_pattern(pattern)
    codebook_size, grid = _codes_manifest(urls)
    counter = SkipCounter()
    exts: Counter = Counter()
    sizes: Counter = Counter()
    keys: Counter = Counter()
    samples = without_caption = 0
    corrupt_samples = 0
    examples: dict[str, str] = {}
    for url in urls:
        for sample in _tar_samples(url, counter):
            samples += 1
            key = sample["__key__"]
            keys[key] += 1
            fields = [k for k in sample if not k.startswith("__")]
            exts.update(fields)
            problems = []  # (kind, detail): what training would skip this sample for
            if caption_key not in sample:
                without_caption += 1
            else:
                try:
                    decode_caption(sample[caption_key])
                except DataError as exc:
                    problems.append(("caption", str(exc)))
            image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if image_ext:
                try:
                    img = load_image(sample[image_ext])
                    sizes[f"{img.width}x{img.height}"] += 1
                except Exception as exc:  # PIL raises many types for damaged files
                    problems.append(("image", str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
            elif CODES_EXT in sample:
                try:
                    codes = decode_codes(sample[CODES_EXT], codebook_size, grid)
                    sizes["codes " + "x".join(map(str, codes.shape))] += 1
                except Exception as exc:
                    problems.append(("codes", str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
            else:
                problems.append(("missing", "no image or codes member"))
            for kind, detail in problems:
                counter.skip(kind, f"{key} in {url}: {detail}")
                examples.setdefault(kind, f"{key} in {url}: {detail}")
            corrupt_samples += bool(problems)
    corrupt = {k: counter.totals[k] for k in SKIP_KINDS if counter.totals[k]}
    return {"pattern": pattern, "shards": len(urls), "samples": samples, "unique_keys": len(keys),
            "duplicate_keys": sum(1 for n in keys.values() if n > 1), "extensions": dict(sorted(exts.items())),
            "sizes": dict(sizes.most_common(10)), "corrupt": corrupt, "corrupt_samples": corrupt_samples,
            "corrupt_examples": examples,
            "truncated_shards": counter.totals["truncated"], "unreadable_shards": counter.totals["shard"],
            "without_caption": without_caption}


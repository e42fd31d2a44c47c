"""``python -m demo emoji``: a folder of captioned images through all three stages to labelled grids and a report;
the worked example is Noto Color Emoji, captioned with their names (docs/emoji.md).

    python -m demo emoji [--out runs/emoji] [--minutes 60] [--images DIR] [--preset full|tiny] [--sequential]
        [--force STAGE ...] [--prompts P ...]

Each stage is the command a user would type for their own images (printed before it runs) and is skipped when its
output exists, so a rerun continues where the last one stopped:

  images      python -m data prepare emoji --as-folder --out OUT/images   the only emoji-specific step: a folder of
              PNG files with same-stem .txt captions, in train/ and val/ (--images DIR: start from yours instead)
  shards      python -m data prepare folder --src IMAGES/train --out OUT/shards/train   (and val)
  vqgan       python train.py vqgan --config configs/vqgan/emoji.yaml ...
  encode      python -m vqgan.encode ... (train and val code shards)
  tokenizer   python -m bart_prior.tokenizer train ...
  bart_prior  python train.py bart_prior --config configs/bart_prior/emoji.yaml ...
  clip_rank   python train.py clip_rank --config configs/clip_rank/emoji.yaml ...
  bundle      python train.py bundle ...
  generate    python generate.py --bundle OUT/bundle CAPTION ... --out OUT/samples/val   (val captions), and
              OUT/samples/new (prompts that are no caption of the set)

then OUT/report/report.md (and report.json): the VQGAN on val (PSNR, SSIM, LPIPS where the VGG16 weights are present,
codebook usage), the prior's val loss and caption gain, CLIP recall@1 over the whole val set, the two labelled grids.

After the VQGAN, encode -> tokenizer -> prior and CLIP run side by side, each on half the cores (--sequential: one
after the other, for a machine shared with other jobs). ``--minutes`` is the whole run's target: the training stages
get shares of it (minus a reserve for the report) as wall-clock caps, and one that starts late is shortened to end in
time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from demo.shapes import _CAP, _exported, _run, max_time, run_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prompts that name no emoji: what the set's parts combine into when a caption is new.
NEW_PROMPTS = ("a purple cat face", "a green heart with a star", "a blue car on fire", "a smiling moon with sunglasses")


@dataclass
class Recipe:
    config: str = "emoji"  # configs/<stage>/<config>.yaml
    vocab_size: int = 1024  # caption tokenizer (byte-level BPE)
    minutes: float = 60.0  # default --minutes
    reserve_minutes: float = 6.0  # kept for the bundle, the samples and the report
    # shares of the training time (--minutes minus the reserve and the time already spent) as wall-clock caps; the
    # prior and CLIP run side by side after the VQGAN (--sequential: one after the other, the second set of shares)
    shares: dict[str, float] = field(default_factory=lambda: {"vqgan": 0.3, "bart_prior": 0.7, "clip_rank": 0.7})
    sequential_shares: dict[str, float] = field(
        default_factory=lambda: {"vqgan": 0.25, "bart_prior": 0.45, "clip_rank": 0.3})
    overrides: dict[str, list[str]] = field(default_factory=dict)
    val_prompts: int = 8  # val captions drawn for the val grid
    new_prompts: Sequence[str] = NEW_PROMPTS
    candidates: int = 16
    keep: int = 4
    # the bundle's sampling defaults: the shapes demo's measured choice (docs/shapes.md), not re-measured here
    sampling: dict[str, float] = field(default_factory=lambda: {"condition_scale": 1.5, "temperature": 0.6})
    lanes: tuple[tuple[str, ...], ...] = (("encode", "tokenizer", "bart_prior"), ("clip_rank",))


RECIPES = {
    "full": Recipe(),
    # seconds per stage: every stage and file format (the tests run it on a folder of a few generated images)
    "tiny": Recipe(config="tiny", vocab_size=300, minutes=0, reserve_minutes=0, val_prompts=2,
                   new_prompts=NEW_PROMPTS[:1], candidates=2, keep=2,
                   overrides={stage: ["trainer.max_steps=4", "trainer.val_check_interval=4", "data.batch_size=4"]
                              for stage in ("vqgan", "bart_prior", "clip_rank")}),
}


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def stages(out: str, images: str, recipe: Recipe, caps: dict[str, float],
           font: Optional[str] = None) -> list[tuple[str, Callable[[], bool], list[list[str]]]]:
    """(name, done?, commands) of the training part, in order; ``caps``: minutes per training stage (absent: the
    config's own)."""
    shards, codes, tok = f"{out}/shards", f"{out}/codes", f"{out}/tokenizer"
    vq_export = f"{out}/vqgan/export"
    img_data = [f"data.train={shards}/train/*.tar", f"data.val={shards}/val/*.tar"]
    code_data = [f"data.train={codes}/train/*.tar", f"data.val={codes}/val/*.tar"]

    def train(stage: str, extra: list[str]) -> list[str]:
        cap = [_CAP + max_time(caps[stage])] if stage in caps else []
        return _py("train.py", stage, "--config", f"configs/{stage}/{recipe.config}.yaml", f"name={stage}",
                   f"runs_dir={out}", "resume=auto", *extra, *recipe.overrides.get(stage, []), *cap)

    render = [] if images != f"{out}/images" else [
        ("images", lambda: os.path.isfile(f"{images}/emoji.json"),
         [_py("-m", "data", "prepare", "emoji", "--as-folder", "--out", images, *(["--font", font] if font else []))])]
    return render + [
        ("shards", lambda: os.path.exists(f"{shards}/val/.done"),
         [_py("-m", "data", "prepare", "folder", "--src", f"{images}/{split}", "--out", f"{shards}/{split}")
          for split in ("train", "val")] + [["touch", f"{shards}/val/.done"]]),
        ("vqgan", lambda: _exported(f"{out}/vqgan"), [train("vqgan", img_data)]),
        ("encode", lambda: os.path.exists(f"{codes}/val/.done"),
         [_py("-m", "vqgan.encode", "--model", vq_export, "--input", f"{shards}/{split}/*.tar",
              "--output", f"{codes}/{split}") for split in ("train", "val")] + [["touch", f"{codes}/val/.done"]]),
        ("tokenizer", lambda: os.path.exists(f"{tok}/tokenizer.json"),
         [_py("-m", "bart_prior.tokenizer", "train", "--input", f"{shards}/train/*.tar",
              "--vocab-size", str(recipe.vocab_size), "--out", tok)]),
        ("bart_prior", lambda: _exported(f"{out}/bart_prior"),
         [train("bart_prior", code_data + [f"tokenizer.path={tok}", f"model.vqgan_for_samples={vq_export}"])]),
        ("clip_rank", lambda: _exported(f"{out}/clip_rank"),
         [train("clip_rank", img_data + [f"model.reconstruct_with={vq_export}"])]),
    ]


def pick_prompts(out: str, recipe: Recipe, seed: int = 0) -> tuple[list[str], list[str]]:
    """(val captions drawn with ``seed``, the recipe's new prompts that are no caption of the train or val set)."""
    from data.shards import iter_captions

    val = sorted(set(iter_captions(f"{out}/shards/val/*.tar")))
    train = set(iter_captions(f"{out}/shards/train/*.tar"))
    random.Random(seed).shuffle(val)
    known = train | set(val)
    return val[:recipe.val_prompts], [p for p in recipe.new_prompts if p not in known]


def generate_command(out: str, prompts: Sequence[str], name: str, recipe: Recipe) -> list[str]:
    return _py("generate.py", "--bundle", f"{out}/bundle", *prompts, "--candidates", str(recipe.candidates),
               "--keep", str(recipe.keep), "--out", f"{out}/samples/{name}")


# ---- the report ----------------------------------------------------------------------------------------------------
def vqgan_eval(vqgan: Any, pattern: str, batch_size: int = 64) -> dict:
    """Reconstructions of every image of ``pattern``: PSNR and SSIM (on [0, 1] pixels), LPIPS (VGG) where its
    weights are on this machine (else ``lpips`` None and ``lpips_missing`` saying why), codebook usage."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from demo.evaluate import reconstructions
    from vqgan.perceptual import FrozenLPIPS, LPIPSWeightsMissing

    try:
        lpips, missing = FrozenLPIPS(None), None
    except LPIPSWeightsMissing as exc:
        lpips, missing = None, str(exc).split(":")[0]
    psnr, ssim, dist, used, n = [], [], [], set(), 0
    for _, x, codes, rec in reconstructions(vqgan, pattern, vqgan.image_size, batch_size=batch_size):
        with torch.inference_mode():
            x01, r01 = (x + 1) / 2, (rec + 1) / 2
            psnr.extend(peak_signal_noise_ratio(r01, x01, data_range=1.0, reduction="none",
                                                dim=(1, 2, 3)).tolist())
            ssim.extend(structural_similarity_index_measure(r01, x01, data_range=1.0, reduction="none").tolist())
            if lpips is not None:
                dist.extend(lpips(rec, x).tolist())
        used.update(codes.flatten().tolist())
        n += len(x)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
    return {"images": n, "psnr": mean(psnr), "ssim": mean(ssim), "lpips": mean(dist), "lpips_missing": missing,
            "codes_used": len(used), "codebook_usage": len(used) / vqgan.codebook_size}


def clip_recall(ranker: Any, pattern: str, image_size: int) -> dict:
    """Recall@1 over the whole val set (not within batches, as training logs it): text -> image (a caption finds
    its own image among all val images) and image -> text. A retrieved item with the same caption counts as found
    (a set may repeat captions)."""
    from data import iter_samples

    samples = list(iter_samples(pattern, mode="images", image_size=image_size))
    captions = [s["caption"] for s in samples]
    img = ranker.image_features(torch.stack([s["image"] for s in samples]))
    txt = ranker.text_features(captions)
    sims = (txt @ img.T).cpu()
    t2i = sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(1).tolist())) / len(samples)
    i2t = sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(0).tolist())) / len(samples)
    return {"items": len(samples), "t2i_R@1": t2i, "i2t_R@1": i2t, "chance": 1 / len(samples)}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_report(r: dict) -> str:
    """report.json -> report.md."""
    v, p, c = r["vqgan"], r["prior"], r["clip"]
    lpips = _num(v["lpips"]) if v["lpips"] is not None else f"n/a ({v['lpips_missing']})"
    lines = [f"# {r['title']}", "", f"Images: {r['images']} ({r['counts'].get('train', '?')} train, "
             f"{r['counts'].get('val', '?')} val). Run: `{r['command']}`.", "",
             "| part | measure on val | value |", "|---|---|---|",
             f"| VQGAN | PSNR / SSIM ({v['images']} images) | {_num(v['psnr'], 2)} dB / {_num(v['ssim'])} |",
             f"| VQGAN | LPIPS (VGG) | {lpips} |",
             f"| VQGAN | codebook usage | {_pct(v['codebook_usage'])} ({v['codes_used']} codes) |",
             f"| prior | val loss | {_num(p.get('val/loss'))} |",
             "| prior | caption gain (val loss with empty captions minus val loss) | "
             f"{_num(p.get('val/caption_gain'))} |",
             f"| CLIP | recall@1 text → image, all {c['items']} val images (chance {_pct(c['chance'])}) | "
             f"{_pct(c['t2i_R@1'])} |",
             f"| CLIP | recall@1 image → text | {_pct(c['i2t_R@1'])} |",
             f"| CLIP | recall@1 text → image within val batches, as training logs it | {_pct(r['clip_logged'])} |",
             "", f"Sampling: the bundle's defaults (condition scale {r['sampling']['condition_scale']:g}, temperature "
             f"{r['sampling']['temperature']:g}), {r['candidates']} candidates per prompt, the best {r['keep']} as "
             "CLIP ranks them; each row's prompt is written to its left, each image's CLIP score under it.", ""]
    for name, title in (("val", "Captions drawn from val (images the parts never trained on)"),
                        ("new", "Prompts that are no caption of the set")):
        s = r["samples"].get(name)
        if s:
            lines += [f"## {title}", "", f"`{s['command']}`", "", f"![{name} grid](../{s['grid']})", ""]
    lines += ["## Stage times (s; stages run side by side overlap)", ""]
    lines += [f"- {k}: {v:g}" for k, v in r["timings_s"].items()]
    if r.get("caps_minutes"):
        lines += ["", "Training caps (minutes): " + ", ".join(f"{k} {v:g}" for k, v in r["caps_minutes"].items())]
    lines += ["", f"Wall time of this invocation: {r['wall_minutes']:.1f} minutes (budget "
              f"{r.get('budget_minutes') or 'none'}{' minutes' if r.get('budget_minutes') else ''}; "
              f"{r.get('cpu_count')} CPU cores).", ""]
    return "\n".join(lines)


def write_report(out: str, recipe: Recipe, samples: dict, timings: dict, caps: dict, started: float,
                 command: str, title: str, minutes: float = 0.0) -> dict:
    """Evaluate the exported parts on the val shards, gather the training logs' last val metrics and the samples'
    grids; write OUT/report/report.json and OUT/report/report.md (demo.evaluate.save_report: one set, swapped in
    whole). Returns the report."""
    from clip_rank import ClipRanker
    from data.shards import iter_captions
    from demo.evaluate import _last_metrics, save_report
    from vqgan import VQGAN

    t0 = time.time()
    counts = {split: sum(1 for _ in iter_captions(f"{out}/shards/{split}/*.tar")) for split in ("train", "val")}
    vqgan = VQGAN.from_pretrained(f"{out}/vqgan/export")
    ranker = ClipRanker.from_pretrained(f"{out}/clip_rank/export")
    report = {"title": title, "command": command, "images": counts["train"] + counts["val"], "counts": counts,
              "vqgan": vqgan_eval(vqgan, f"{out}/shards/val/*.tar"),
              "prior": _last_metrics(f"{out}/bart_prior", ["val/loss", "val/caption_gain"]),
              "clip": clip_recall(ranker, f"{out}/shards/val/*.tar", vqgan.image_size),
              "clip_logged": _last_metrics(f"{out}/clip_rank", ["val/t2i_R@1"])["val/t2i_R@1"],
              "sampling": recipe.sampling, "candidates": recipe.candidates, "keep": recipe.keep, "samples": samples,
              "timings_s": {**timings, "report": round(time.time() - t0, 1)}, "caps_minutes": caps,
              "budget_minutes": minutes, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    report["wall_minutes"] = (time.time() - started) / 60
    save_report(out, report, render_report(report))
    return report


# ---- the command ---------------------------------------------------------------------------------------------------
def training_caps(recipe: Recipe, minutes: float, sequential: bool) -> dict[str, float]:
    """Minutes per training stage: its share of ``minutes`` minus the reserve (none when ``minutes`` is 0)."""
    if not minutes:
        return {}
    train_minutes = max(1.0, minutes - recipe.reserve_minutes)
    shares = recipe.sequential_shares if sequential else recipe.shares
    return {stage: round(share * train_minutes, 2) for stage, share in shares.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo emoji", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/emoji")
    p.add_argument("--images", help="a folder with train/ and val/ subfolders of images and same-stem .txt captions "
                                    "(default: render Noto Color Emoji into OUT/images)")
    p.add_argument("--font", help="with the default images: the emoji font (default: Noto Color Emoji from "
                                  "Debian's fonts-noto-color-emoji)")
    p.add_argument("--preset", choices=sorted(RECIPES), default="full")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"the whole run's target (full preset: {RECIPES['full'].minutes:g}; 0: the configs' own "
                        "step counts and caps): training stages get shares of it and end by its deadline")
    p.add_argument("--sequential", action="store_true",
                   help="run the prior's lane and CLIP one after the other instead of side by side")
    p.add_argument("--prompts", nargs="+", help="the new prompts (default: a few that name no emoji)")
    p.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their output exists")
    args = p.parse_args(argv)
    started = time.time()
    recipe = RECIPES[args.preset]
    if args.prompts:
        recipe = Recipe(**{**recipe.__dict__, "new_prompts": tuple(args.prompts)})
    minutes = recipe.minutes if args.minutes is None else args.minutes
    if minutes < 0 or (minutes and minutes <= recipe.reserve_minutes):
        p.error(f"--minutes must be 0 or more than the {recipe.reserve_minutes:g} minutes kept for the report")
    out = os.path.abspath(args.out)
    images = os.path.abspath(args.images) if args.images else f"{out}/images"
    if args.images and not all(os.path.isdir(os.path.join(images, s)) for s in ("train", "val")):
        p.error(f"--images {args.images} must hold train/ and val/ folders of images with same-stem .txt captions")
    deadline = started + (minutes - recipe.reserve_minutes) * 60 if minutes else None
    caps = training_caps(recipe, minutes, args.sequential)
    if deadline:
        print(f"budget: {minutes:g} minutes; training ends by {time.strftime('%H:%M:%S', time.localtime(deadline))}",
              flush=True)
    lanes = () if args.sequential else recipe.lanes
    # one after the other: each on OMP_NUM_THREADS threads where it is set (vqgan.encode would take every core)
    threads = int(os.environ["OMP_NUM_THREADS"]) if args.sequential and os.environ.get("OMP_NUM_THREADS",
                                                                                           "").isdigit() else None
    timings, ran_caps = run_stages(stages(out, images, recipe, caps, args.font), lanes, out, args.force, deadline,
                                   threads)

    val_prompts, new_prompts = pick_prompts(out, recipe)
    bundle = [*_py("train.py", "bundle", "--vqgan", f"{out}/vqgan/export", "--bart-prior", f"{out}/bart_prior/export",
                   "--clip-rank", f"{out}/clip_rank/export"),
              *[a for k, v in recipe.sampling.items() for a in (f"--{k.replace('_', '-')}", f"{v:g}")],
              "--out", f"{out}/bundle"]
    fresh = bool(timings)  # a stage ran: the bundle and the samples are made again
    for name, marker, commands in (
            ("bundle", "bundle/bundle.json", [bundle]),
            ("generate", "samples/val/results.json", [generate_command(out, ps, split, recipe) for split, ps in
                                                      (("val", val_prompts), ("new", new_prompts)) if ps])):
        if not fresh and name not in args.force and os.path.exists(os.path.join(out, marker)):
            print(f"[{name}] done already, skipped (--force {name} reruns it)")
            continue
        print(f"\n[{name}]", flush=True)
        t0 = time.time()
        for cmd in commands:
            _run(cmd)
        timings[name] = round(time.time() - t0, 1)
        fresh = True
    samples = {split: {"prompts": ps, "grid": f"samples/{split}/grid.png",
                       "command": "python generate.py --bundle OUT/bundle " + " ".join(json.dumps(x) for x in ps)
                       + f" --candidates {recipe.candidates} --keep {recipe.keep} --out OUT/samples/{split}"}
               for split, ps in (("val", val_prompts), ("new", new_prompts)) if ps}
    shown = "python -m demo emoji" + ("" if args.preset == "full" else f" --preset {args.preset}") + (
        f" --images {args.images}" if args.images else "") + (f" --minutes {minutes:g}" if args.minutes is not None
                                                               else "") + (" --sequential" if args.sequential else "")
    title = ("Noto Color Emoji" if not args.images else os.path.basename(images.rstrip("/"))) + \
        ": captioned images end to end"
    write_report(out, recipe, samples, timings, ran_caps, started, shown, title, minutes)
    print(f"\nreport: {out}/report/report.md\ngrids:  " + "  ".join(f"{out}/{s['grid']}" for s in samples.values())
          + f"\nbundle: {out}/bundle (python generate.py --bundle {out}/bundle \"a prompt\" --out OUT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

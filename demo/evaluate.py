"""Prompt fidelity on the shapes set, measured by the shapes oracle: the demo's report.

For each val prompt (seen and held-out attribute combinations) the pipeline draws N candidates; the oracle says
which attributes each candidate got right. Reported per attribute and all-correct:
  random      the mean over candidates (what an unranked sample gets),
  clip_best   the candidate CLIP ranks first (in the chosen setting with the demo's test-time views, in the sweeps
              with one view),
  oracle_best whether any candidate is all-correct (the ceiling of ranking),
plus the oracle on VQGAN reconstructions of val images (the ceiling of the whole pipeline), for a sweep of the
condition scale, from which the default scale is chosen, and clip_best / oracle_best among the first k candidates
(the candidates curve: is the number of candidates or the ranker the limit?).

The report evaluates the exported parts (OUT/vqgan/export, OUT/bart_prior/export, OUT/clip_rank/export) and never
writes into them; the demo then assembles OUT/bundle with the sampling settings the report chose.
"""
from __future__ import annotations

import csv
import os
import time
from itertools import islice
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from core.files import atomic_folder, write_json
from demo.report_markdown import ATTRIBUTES, fmt as _fmt, fmt_gain, render as _markdown
from pipeline.images import labelled_grid, make_grid, save_png, to_uint8


def _oracle():
    from data.oracle import score

    return score


def val_prompts(out: str, num_seen: int, num_heldout: int) -> list[tuple[str, bool]]:
    """(caption, held_out) pairs: seen combinations first, then combinations held out of training."""
    from data.shapes import val_prompts as pick

    return [(p["caption"], p["heldout"]) for p in pick(os.path.join(out, "shapes"), num_seen, num_heldout)]


def reconstructions(vqgan: Any, pattern: str, image_size: int, limit: Optional[int] = None,
                    batch_size: int = 64) -> Iterator[tuple[list[dict], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first ``limit`` images of ``pattern`` (all without a limit) through the VQGAN, in batches: (samples,
    images, codes, reconstructions clamped to [-1, 1])."""
    from data import iter_samples

    samples = islice(iter_samples(pattern, mode="images", image_size=image_size), limit)
    while batch := list(islice(samples, batch_size)):
        images = torch.stack([s["image"] for s in batch])
        with torch.inference_mode():
            codes = vqgan.encode(images)
            recon = vqgan.decode(codes).float().clamp(-1, 1)
        yield batch, images, codes, recon


def reconstruction_eval(vqgan: Any, pattern: str, image_size: int, limit: int = 512,
                        batch_size: int = 64) -> dict[str, float]:
    """PSNR and oracle intactness of VQGAN reconstructions of val images."""
    score = _oracle()
    intact, psnrs, used = [], [], set()
    for batch, images, codes, recon in reconstructions(vqgan, pattern, image_size, limit, batch_size):
        used.update(codes.flatten().tolist())
        mse = ((recon - images) ** 2).flatten(1).mean(1) / 4.0  # [-1,1] -> [0,1] scale
        psnrs.extend((-10 * torch.log10(mse.clamp_min(1e-10))).tolist())
        for s, img in zip(batch, to_uint8(recon)):
            intact.append(score(s["caption"], img)["all"])
    return {"images": len(intact), "oracle_all_correct": float(np.mean(intact)), "psnr": float(np.mean(psnrs)),
            "codes_used": len(used), "codebook_usage": len(used) / vqgan.codebook_size}


def ranking_gain(rows: Sequence[dict], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """CLIP-best minus random-candidate all-correct (a fraction) with a 95% bootstrap interval over prompts.

    With 128 prompts it is about +-5 points: single demo runs with the same settings scatter that much.
    """
    gain = np.array([float(p["candidates"][p["clip_best"]]["all"]) - np.mean([c["all"] for c in p["candidates"]])
                     for p in rows])
    draws = np.random.default_rng(seed).integers(0, len(gain), size=(resamples, len(gain)))
    lo, hi = np.percentile(gain[draws].mean(1), [2.5, 97.5])
    return float(gain.mean()), float(lo), float(hi)


def room_share(random_all: float, ranked_all: float, oracle_all: float) -> Optional[float]:
    """The ranking gain as a share of its room, (ranked - random) / (oracle-best - random); None without room.

    The gain cannot exceed oracle-best minus random, and that room shrinks as the generator improves, so the share
    compares rankers across bundles (and machines) where the gain in points cannot."""
    room = oracle_all - random_all
    return None if room <= 1e-9 else (ranked_all - random_all) / room


def _splits(per_prompt: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """(split name, its prompts) for seen, held_out and all; a split without prompts is left out."""
    splits = [(split, [p for p in per_prompt if keep is None or p["held_out"] == keep])
              for split, keep in (("seen", False), ("held_out", True), ("all", None))]
    return [(split, rows) for split, rows in splits if rows]


def _pick(row: dict, k: Optional[int] = None) -> int:
    """The candidate CLIP ranks first among a report row's first k (all of them with k None)."""
    return int(torch.tensor(row["clip_scores"][:k]).argmax())


def curve_points(candidates: int) -> list[int]:
    """The k of a candidates curve: powers of two below ``candidates``, then ``candidates``."""
    return sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < candidates} | {candidates})


def candidates_curve(per_prompt: Sequence[dict], ks: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """All-correct of the ranked pick and of the best candidate when only the first k of each prompt's candidates had
    been drawn (per-candidate seeds: the first k of N are exactly what a k-candidate run draws).
    Returns {str(k): {split: {"clip_best_all", "oracle_best_all"}}}."""
    return {str(k): {split: {
        "clip_best_all": float(np.mean([p["candidates"][_pick(p, k)]["all"] for p in rows])),
        "oracle_best_all": float(np.mean([any(c["all"] for c in p["candidates"][:k]) for p in rows]))}
        for split, rows in _splits(per_prompt)} for k in ks}


def _summaries(per_prompt: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for split, rows in _splits(per_prompt):
        summary = {"prompts": len(rows)}
        for key in ("all",) + ATTRIBUTES:
            summary[f"random_{key}"] = float(np.mean([np.mean([c[key] for c in p["candidates"]]) for p in rows]))
            summary[f"clip_best_{key}"] = float(np.mean([p["candidates"][p["clip_best"]][key] for p in rows]))
        summary["oracle_best_all"] = float(np.mean([any(c["all"] for c in p["candidates"]) for p in rows]))
        summary["ranking_gain"], summary["ranking_gain_lo"], summary["ranking_gain_hi"] = ranking_gain(rows)
        summary["ranking_share"] = room_share(summary["random_all"], summary["clip_best_all"],
                                              summary["oracle_best_all"])
        out[split] = summary
    return out


def _draw(pipe: Any, prompts: Sequence[tuple[str, bool]], candidates: int, scale: Optional[float], seed: int,
          batch_size: int, temperature: Optional[float],
          precision: str) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """Each prompt's decoded candidates (float in [-1, 1] for CLIP, uint8 for the oracle and grids) and the oracle's
    verdict on each."""
    score = _oracle()
    # one call for all prompts: the sampler batches candidates of several prompts together
    codes = pipe.prior.generate([p for p, _ in prompts], num_candidates=candidates, condition_scale=scale, seed=seed,
                                batch_size=batch_size, temperature=temperature, precision=precision)
    drawn = []
    for (prompt, _), prompt_codes in zip(prompts, codes):
        images = pipe.decode(prompt_codes, batch_size)
        u8 = to_uint8(images)
        drawn.append((images, u8, [score(prompt, img) for img in u8], prompt_codes))
    return drawn


def _ranked(ranker: Any, prompts: Sequence[tuple[str, bool]], drawn: list, shifts: int = 0) -> list[dict]:
    """Report rows: CLIP's scores of each prompt's candidates, the pick, and the oracle's verdicts."""
    rows = []
    for (prompt, held_out), (images, _, verdicts, _) in zip(prompts, drawn):
        row = {"prompt": prompt, "held_out": held_out,
               "clip_scores": ranker.score([prompt] * len(images), images, shifts=shifts).tolist(),
               "candidates": verdicts}
        rows.append(row | {"clip_best": _pick(row)})
    return rows


def _parts(out: str, load_clip: bool = True) -> Any:
    """The demo's pipeline: its bundle when there is one, else the exported parts."""
    from pipeline import Pipeline

    bundle = os.path.join(out, "bundle")
    if os.path.isdir(bundle):
        return Pipeline.from_pretrained(bundle, load_clip=load_clip)
    return Pipeline.from_pretrained(vqgan=os.path.join(out, "vqgan", "export"),
                                    bart_prior=os.path.join(out, "bart_prior", "export"),
                                    clip_rank=os.path.join(out, "clip_rank", "export"), load_clip=load_clip)


def compare_rankers(out: str, clips: Sequence[str], num_seen: int = 64, num_heldout: int = 64, candidates: int = 16,
                    scale: Optional[float] = None, temperature: Optional[float] = None, seed: int = 0,
                    batch_size: int = 256, rank_shifts: int = 0) -> dict[str, dict]:
    """Rank the same candidates with several CLIP export folders: the demo's prior (its bundle's, at the stored
    sampling defaults unless ``scale``/``temperature`` are given) draws them and the oracle scores them once, so the
    summaries differ only by the ranker. Returns {clip folder: summaries as in the report, plus its candidates
    curve}."""
    from clip_rank import ClipRanker

    pipe = _parts(out, load_clip=False)
    prompts = val_prompts(out, num_seen, num_heldout)
    drawn = _draw(pipe, prompts, candidates, scale, seed, batch_size, temperature, "auto")
    results = {}
    for clip in clips:
        rows = _ranked(ClipRanker.from_pretrained(clip, device=pipe.device), prompts, drawn, rank_shifts)
        results[clip] = {**_summaries(rows), "candidates_curve": candidates_curve(rows, curve_points(candidates))}
    return results


def _last_metrics(run_dir: str, keys: Sequence[str]) -> dict[str, Optional[float]]:
    """The last logged value of each key in a run's CSV log."""
    path = os.path.join(run_dir, "csv", "metrics.csv")
    found: dict[str, Optional[float]] = {k: None for k in keys}
    if not os.path.exists(path):
        return found
    with open(path) as fh:
        for row in csv.DictReader(fh):
            for k in keys:
                if row.get(k) not in (None, ""):
                    found[k] = float(row[k])
    return found


def write_report(out: str, num_seen: int, num_heldout: int, candidates: int, scales: Sequence[float],
                 temperatures: Sequence[float] = (1.0,), timings: Optional[dict] = None, seed: int = 0,
                 rank_shifts: int = 0, caps_minutes: Optional[dict] = None, bare_grid: bool = False) -> dict:
    """Evaluate the exported parts in ``out``; write report.json, report.md and grid.png into ``out``/report. The scale
    sweep samples at ``temperatures[0]``; the other temperatures are then tried at the best scale. The sweeps rank
    with one CLIP view; the chosen setting is then ranked with ``rank_shifts`` test-time views (as
    ``generate.py --rank-shifts`` ranks). ``timings``: seconds per stage run before; the report adds its own.
    ``caps_minutes``: the wall-clock caps the training stages ran under (the demo shortens them near its deadline).
    grid.png: each row's prompt to its left ("held out: " before a held-out combination) and each candidate's CLIP
    score under it; ``bare_grid``: the images alone.
    Returns the report; its ``sampling`` entry holds the chosen settings, which the demo stores in its bundle."""
    from pipeline import Pipeline

    started = time.time()
    pipe = Pipeline.from_pretrained(vqgan=os.path.join(out, "vqgan", "export"),
                                    bart_prior=os.path.join(out, "bart_prior", "export"),
                                    clip_rank=os.path.join(out, "clip_rank", "export"))
    prompts = val_prompts(out, num_seen, num_heldout)
    recon = reconstruction_eval(pipe.vqgan, os.path.join(out, "shapes", "val", "*.tar"), pipe.vqgan.image_size)
    # details key -> (summaries, per-prompt rows, drawn candidates); the candidates stay in memory (~125 MB per draw
    # at the demo size) so that the chosen draw can be ranked again with more views
    runs: dict[str, tuple] = {}

    def run(key: str, scale: float, t: float) -> dict:
        # 256 candidates per decoder batch: fuller matrix products and fewer Python steps per sequence than 64
        drawn = _draw(pipe, prompts, candidates, scale, seed, 256, t, "auto")
        rows = _ranked(pipe.ranker, prompts, drawn)  # one view: the sweeps only pick the setting
        runs[key] = (_summaries(rows), rows, drawn)
        return runs[key][0]

    base_t = float(temperatures[0])  # the scale sweep's temperature; the others are tried at the best scale
    sweep = {str(scale): run(str(scale), scale, base_t) for scale in scales}
    best = max(scales, key=lambda s: (sweep[str(s)]["all"]["clip_best_all"], -s))
    t_keys = {str(base_t): str(best)}  # temperature -> its run at the best scale
    for t in map(float, temperatures[1:]):
        if str(t) not in t_keys:
            t_keys[str(t)] = f"{best}@T{t}"
            run(t_keys[str(t)], best, t)
    t_sweep = {t: runs[key][0] for t, key in t_keys.items()}
    best_t = max(t_sweep, key=lambda t: (t_sweep[t]["all"]["clip_best_all"], float(t)))
    chosen_drawn = runs[t_keys[best_t]][2]
    chosen_rows = _ranked(pipe.ranker, prompts, chosen_drawn, rank_shifts)
    chosen = _summaries(chosen_rows)
    chosen_grids = {}  # prompt -> (its candidates best first, their CLIP scores, held out?)
    for row, (_, u8, _, _) in zip(chosen_rows, chosen_drawn):
        order = torch.tensor(row["clip_scores"]).argsort(descending=True)
        chosen_grids[row["prompt"]] = (u8[order], [row["clip_scores"][i] for i in order.tolist()], row["held_out"])
    details = {key: r[1] for key, r in runs.items()} | {"chosen": chosen_rows}
    sampling = {"condition_scale": float(best), "temperature": float(best_t)}
    report = {"condition_scale": best, "temperature": float(best_t), "sampling": sampling,
              "rank_shifts": rank_shifts, "chosen": chosen,
              "chosen_one_view": t_sweep[best_t], "temperature_sweep": t_sweep, "candidates": candidates,
              "seed": seed, "sweep": sweep,
              "candidates_curve": candidates_curve(chosen_rows, curve_points(candidates)),
              "reconstruction": recon,
              "prior": _last_metrics(os.path.join(out, "bart_prior"),
                                     ["val/loss", "val/perplexity", "val/caption_gain"]),
              "clip": _last_metrics(os.path.join(out, "clip_rank"), ["val/t2i_R@1", "val/i2t_R@1"]),
              "timings_s": {**(timings or {}), "report": round(time.time() - started, 1)},
              "caps_minutes": dict(caps_minutes or {})}
    shown = list(dict.fromkeys([p for p, _ in prompts[:6]] + [p for p, h in prompts if h][:6]))
    keep = min(4, candidates)
    rows = torch.cat([chosen_grids[p][0][:keep] for p in shown])
    if bare_grid:
        grid = make_grid(rows, nrow=keep)
    else:
        grid = labelled_grid(rows, [("held out: " if chosen_grids[p][2] else "") + p for p in shown], nrow=keep,
                             scores=[s for p in shown for s in chosen_grids[p][1][:keep]])
    save_report(out, report, _markdown(report), details, grid)
    return report


REPORT_FOLDER = "report"


def save_report(out: str, report: dict, markdown: str, details: Optional[dict] = None,
                grid: Optional[torch.Tensor] = None) -> str:
    """The report's files as one set, OUT/report/: report.json, report.md and, when given, report_details.json and
    grid.png. They are written into a temporary folder that then replaces OUT/report in one step
    (core.files.atomic_folder): a crash leaves the whole previous report or the whole new one, never the grid of one
    beside the numbers of another. Returns the folder."""
    folder = os.path.join(out, REPORT_FOLDER)
    with atomic_folder(folder) as tmp:
        if grid is not None:
            save_png(grid, os.path.join(tmp, "grid.png"))
        write_json(os.path.join(tmp, "report.json"), report)
        if details is not None:
            write_json(os.path.join(tmp, "report_details.json"), details)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as fh:
            fh.write(markdown)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from clip_rank.ranker import shift_offsets

    p = argparse.ArgumentParser(description="Rank one set of demo candidates with several CLIP exports, and show how "
                                            "each ranks the first k of them: "
                                            "python -m demo.evaluate --out runs/demo --clip-rank DIR [DIR ...]")
    p.add_argument("--out", default="runs/demo", help="a demo folder (bundle/ or the exports, and shapes/)")
    p.add_argument("--clip-rank", "--clip", dest="clip_rank", nargs="+", required=True,
                   help="CLIP export folders (e.g. runs/NAME/export)")
    p.add_argument("--prompts", type=int, nargs=2, default=[64, 64], metavar=("SEEN", "HELD_OUT"))
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--condition-scale", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--rank-shifts", type=int, default=0,
                   help="CLIP test-time shift views, as generate.py's (the demo's report uses 2)")
    args = p.parse_args(argv)
    results = compare_rankers(args.out, args.clip_rank, *args.prompts, candidates=args.candidates,
                              scale=args.condition_scale, temperature=args.temperature, rank_shifts=args.rank_shifts)
    print(f"Ranked with {len(shift_offsets(args.rank_shifts))} CLIP view(s) per image "
          f"(--rank-shifts {args.rank_shifts}).\n")
    print("| CLIP | random all-correct | ranked-best all-correct | ranking gain (95% CI) | share of the room | "
          "oracle-best |\n|---|---|---|---|---|---|")
    for clip, summary in results.items():
        s = summary["all"]
        print(f"| {clip} | {_fmt(s['random_all'])} | {_fmt(s['clip_best_all'])} | {fmt_gain(s)} | "
              f"{_fmt(s['ranking_share'])} | {_fmt(s['oracle_best_all'])} |")
    print("\nCandidates curve (the first k candidates of each prompt): ranked-best all-correct seen / held-out / all; "
          "oracle-best all\n\n| CLIP | k | seen | held-out | all | oracle-best |\n|---|---|---|---|---|---|")
    for clip, summary in results.items():
        for k, c in summary["candidates_curve"].items():
            print(f"| {clip} | {k} | {_fmt(c['seen']['clip_best_all'])} | {_fmt(c['held_out']['clip_best_all'])} | "
                  f"{_fmt(c['all']['clip_best_all'])} | {_fmt(c['all']['oracle_best_all'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prompt fidelity on the shapes set, measured by the shapes oracle: the demo's report.

For each val prompt (seen and held-out attribute combinations) the pipeline draws N candidates; the oracle says
which attributes each candidate got right. Reported per attribute and all-correct:
  random      the mean over candidates (what an unranked sample gets),
  clip_best   the candidate ranked first (in the chosen setting as generate.py ranks, launch.pipeline.rank_scores,
              and once more with or without the prior's log-likelihood for comparison; CLIP alone in the sweeps),
  oracle_best whether any candidate is all-correct (the ceiling of ranking),
plus the oracle on VQGAN reconstructions of val images (the ceiling of the whole pipeline), for a sweep of the
condition scale, from which the default scale is chosen, and clip_best / oracle_best among the first k candidates
(the candidates curve: is the number of candidates or the ranker the limit?).
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from launch.images import make_grid, save_png, to_uint8
from launch.report_markdown import ATTRIBUTES, fmt as _fmt, fmt_gain, render as _markdown

# The report also ranks the chosen draw with the prior's log-likelihood at this weight when generate.py ranks by CLIP
# alone (and by CLIP alone when it does not): each demo run adds a paired comparison (README, demo, session 13).
ALTERNATIVE_PRIOR_WEIGHT = 0.25


def _oracle():
    from data.oracle import score

    return score


def val_prompts(out: str, num_seen: int, num_heldout: int) -> list[tuple[str, bool]]:
    """(caption, held_out) pairs: seen combinations first, then combinations held out of training."""
    from data.shapes import val_prompts as pick

    return [(p["caption"], p["heldout"]) for p in pick(os.path.join(out, "shapes"), num_seen, num_heldout)]


def reconstruction_eval(vqgan: Any, pattern: str, image_size: int, limit: int = 512,
                        batch_size: int = 64) -> dict[str, float]:
    """PSNR and oracle intactness of VQGAN reconstructions of val images."""
    from data import iter_samples

    score = _oracle()
    intact, psnrs, used = [], [], set()
    batch: list[dict] = []

    def flush() -> None:
        images = torch.stack([s["image"] for s in batch])
        with torch.inference_mode():
            codes = vqgan.encode(images)
            recon = vqgan.decode(codes).float().clamp(-1, 1)
        used.update(codes.flatten().tolist())
        mse = ((recon - images) ** 2).flatten(1).mean(1) / 4.0  # [-1,1] -> [0,1] scale
        psnrs.extend((-10 * torch.log10(mse.clamp_min(1e-10))).tolist())
        for s, img in zip(batch, to_uint8(recon)):
            intact.append(score(s["caption"], img)["all"])
        batch.clear()

    for i, sample in enumerate(iter_samples(pattern, mode="images", image_size=image_size)):
        if i >= limit:
            break
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
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

    The gain cannot exceed oracle-best minus random, and that room shrinks as the generator improves (random 64% ->
    86% between the demo's machines, README, demo, session 15), so the share compares rankers across bundles where the
    gain in points cannot."""
    room = oracle_all - random_all
    return None if room <= 1e-9 else (ranked_all - random_all) / room


def _splits(per_prompt: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """(split name, its prompts) for seen, held_out and all; a split without prompts is left out."""
    splits = [(split, [p for p in per_prompt if keep is None or p["held_out"] == keep])
              for split, keep in (("seen", False), ("held_out", True), ("all", None))]
    return [(split, rows) for split, rows in splits if rows]


def _rank_scores(row: dict, k: Optional[int] = None) -> torch.Tensor:
    """What a report row's first k candidates (all of them with k None) are ranked by."""
    from launch.pipeline import rank_scores

    loglik = row.get("log_likelihood")
    return rank_scores(torch.tensor(row["clip_scores"][:k]), None if loglik is None else torch.tensor(loglik[:k]),
                       row.get("prior_weight", 0.0))


def _pick(row: dict, k: Optional[int] = None) -> int:
    return int(_rank_scores(row, k).argmax())


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


def _log_likelihood(pipe: Any, prompts: Sequence[tuple[str, bool]], drawn: list,
                    temperature: Optional[float]) -> torch.Tensor:
    """(prompts, candidates) log p(codes | prompt) of drawn candidates, scored as generate.py scores them."""
    return pipe.prior.log_likelihood([p for p, _ in prompts], torch.stack([d[3] for d in drawn]),
                                     temperature=temperature, batch_size=64, precision="auto")


def _ranked(ranker: Any, prompts: Sequence[tuple[str, bool]], drawn: list, shifts: int = 0,
            loglik: Optional[torch.Tensor] = None, prior_weight: float = 0.0) -> list[dict]:
    """Report rows: CLIP's scores of each prompt's candidates (and the prior's log-likelihoods when given, weighed
    by ``prior_weight`` as generate.py weighs them), the pick, and the oracle's verdicts."""
    rows = []
    for i, ((prompt, held_out), (images, _, verdicts, _)) in enumerate(zip(prompts, drawn)):
        row = {"prompt": prompt, "held_out": held_out,
               "clip_scores": ranker.score([prompt] * len(images), images, shifts=shifts).tolist(),
               "candidates": verdicts}
        if loglik is not None:
            row |= {"log_likelihood": loglik[i].tolist(), "prior_weight": prior_weight}
        rows.append(row | {"clip_best": _pick(row)})
    return rows


def _reweighted(rows: Sequence[dict], prior_weight: float) -> list[dict]:
    """The same rows (with log-likelihoods) ranked with another weight of the prior's term."""
    rows = [r | {"prior_weight": prior_weight} for r in rows]
    return [r | {"clip_best": _pick(r)} for r in rows]


def compare_rankers(out: str, clips: Sequence[str], num_seen: int = 64, num_heldout: int = 64, candidates: int = 16,
                    scale: Optional[float] = None, temperature: Optional[float] = None, seed: int = 0,
                    batch_size: int = 256, rank_shifts: int = 0, prior_weight: float = 0.0) -> dict[str, dict]:
    """Rank the same candidates with several CLIP export folders: ``out/bundle``'s prior draws them (at its stored
    defaults unless ``scale``/``temperature`` are given) and the oracle scores them once, so the summaries differ only
    by the ranker. ``prior_weight``: the prior's log-likelihood joins each CLIP's scores as in generate.py.
    Returns {clip folder: summaries as in the report, plus its candidates curve (and with ``prior_weight``, under
    "clip_alone", the summaries of that CLIP ranking alone)}."""
    from clip_rank import ClipRanker
    from launch.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(os.path.join(out, "bundle"), load_clip=False)
    prompts = val_prompts(out, num_seen, num_heldout)
    drawn = _draw(pipe, prompts, candidates, scale, seed, batch_size, temperature, "auto")
    loglik = _log_likelihood(pipe, prompts, drawn, temperature) if prior_weight else None  # CLIP alone: not needed
    results = {}
    for clip in clips:
        rows = _ranked(ClipRanker.from_pretrained(clip, device=pipe.device), prompts, drawn, rank_shifts, loglik,
                       prior_weight)
        results[clip] = {**_summaries(rows), "candidates_curve": candidates_curve(rows, curve_points(candidates))}
        if prior_weight:  # the paired comparison: the same candidates by this CLIP alone
            results[clip]["clip_alone"] = _summaries(_reweighted(rows, 0.0))
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


def set_sampling_defaults(prior_dir: str, scale: float, temperature: float) -> None:
    """Record the measured best condition scale and temperature as the bundle prior's defaults (generate.py uses
    them)."""
    path = os.path.join(prior_dir, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    config["condition_scale"], config["temperature"] = float(scale), float(temperature)
    with open(path + ".tmp", "w") as fh:
        json.dump(config, fh, indent=2)
    os.replace(path + ".tmp", path)


def write_report(out: str, num_seen: int, num_heldout: int, candidates: int, scales: Sequence[float],
                 temperatures: Sequence[float] = (1.0,), timings: Optional[dict] = None, seed: int = 0,
                 rank_shifts: Optional[int] = None, caps_minutes: Optional[dict] = None,
                 prior_weight: Optional[float] = None) -> dict:
    """Evaluate the bundle in ``out/bundle``; write report.json, report.md and grid.png into ``out``. The scale sweep
    samples at ``temperatures[0]``; the other temperatures are then tried at the best scale. The sweeps rank with one
    CLIP view (17x cheaper); the chosen setting is then ranked as generate.py ranks it, with ``rank_shifts`` test-time
    views and the prior's log-likelihood at ``prior_weight`` (defaults: launch.pipeline.RANK_SHIFTS and
    PRIOR_WEIGHT), and for comparison with ALTERNATIVE_PRIOR_WEIGHT (or CLIP alone, if ``prior_weight`` is not 0).
    ``timings``: seconds per stage run before; the report adds its own.
    ``caps_minutes``: the wall-clock caps the training stages ran under (the demo shortens them near its deadline)."""
    from launch.pipeline import PRIOR_WEIGHT, RANK_SHIFTS, Pipeline

    started = time.time()
    rank_shifts = RANK_SHIFTS if rank_shifts is None else rank_shifts
    prior_weight = PRIOR_WEIGHT if prior_weight is None else prior_weight
    pipe = Pipeline.from_pretrained(os.path.join(out, "bundle"))
    prompts = val_prompts(out, num_seen, num_heldout)
    recon = reconstruction_eval(pipe.vqgan, os.path.join(out, "shapes", "val", "*.tar"), pipe.vqgan.image_size)
    # details key -> (summaries, per-prompt rows, drawn candidates); the candidates stay in memory (~125 MB per draw
    # at the demo size) so that the chosen draw can be ranked again with more views
    runs: dict[str, tuple] = {}

    def run(key: str, scale: float, t: float) -> dict:
        # 256 candidates per decoder batch: with the shapes prior on 2 CPU threads they sampled at 41.5 ms per
        # sequence, 128 at 44.6 and 64 at 61.3 (fuller matrix products, fewer Python steps per sequence)
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
    loglik = _log_likelihood(pipe, prompts, chosen_drawn, float(best_t))  # ~0.1 s per prompt: both rankings get it
    chosen_rows = _ranked(pipe.ranker, prompts, chosen_drawn, rank_shifts, loglik, prior_weight)
    alternative = ALTERNATIVE_PRIOR_WEIGHT if prior_weight == 0 else 0.0
    chosen = _summaries(chosen_rows)
    chosen_grids = {row["prompt"]: u8[_rank_scores(row).argsort(descending=True)]
                    for row, (_, u8, _, _) in zip(chosen_rows, chosen_drawn)}
    details = {key: r[1] for key, r in runs.items()} | {"chosen": chosen_rows}
    set_sampling_defaults(os.path.join(out, "bundle", "bart_prior"), best, float(best_t))
    report = {"condition_scale": best, "temperature": float(best_t), "rank_shifts": rank_shifts,
              "prior_weight": prior_weight, "chosen": chosen, "alternative_prior_weight": alternative,
              "chosen_alternative": _summaries(_reweighted(chosen_rows, alternative)),
              "chosen_one_view": t_sweep[best_t], "temperature_sweep": t_sweep, "candidates": candidates,
              "seed": seed, "sweep": sweep,
              "candidates_curve": candidates_curve(chosen_rows, curve_points(candidates)),
              "reconstruction": recon,
              "prior": _last_metrics(os.path.join(out, "bart_prior"),
                                     ["val/loss", "val/perplexity", "val/caption_gain"]),
              "clip": _last_metrics(os.path.join(out, "clip"), ["val/t2i_R@1", "val/i2t_R@1"]),
              "timings_s": {**(timings or {}), "report": round(time.time() - started, 1)},
              "caps_minutes": dict(caps_minutes or {})}
    shown = [p for p, _ in prompts[:6]] + [p for p, h in prompts if h][:6]
    keep = min(4, candidates)
    rows = torch.cat([chosen_grids[p][:keep] for p in dict.fromkeys(shown)])
    save_png(make_grid(rows, nrow=keep), os.path.join(out, "grid.png"))
    for name, payload in (("report.json", report), ("report_details.json", details)):
        with open(os.path.join(out, name + ".tmp"), "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(_markdown(report))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Rank one set of demo candidates with several CLIP exports, and show how "
                                            "each ranks the first k of them: "
                                            "python -m launch.evaluate --out runs/demo --clip DIR [DIR ...]")
    p.add_argument("--out", default="runs/demo", help="a demo folder (bundle/ and shapes/)")
    p.add_argument("--clip", nargs="+", required=True, help="CLIP export folders (e.g. runs/NAME/export)")
    p.add_argument("--prompts", type=int, nargs=2, default=[64, 64], metavar=("SEEN", "HELD_OUT"))
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--condition-scale", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--rank-shifts", type=int, default=None,
                   help="CLIP test-time shift views, as generate.py's (default: launch.pipeline.RANK_SHIFTS)")
    p.add_argument("--rank-prior-weight", type=float, default=None,
                   help="the prior's log-likelihood next to CLIP, as generate.py's (default: launch.pipeline."
                        "PRIOR_WEIGHT; 0 = CLIP alone)")
    args = p.parse_args(argv)
    from clip_rank.ranker import shift_offsets
    from launch.pipeline import PRIOR_WEIGHT, RANK_SHIFTS

    shifts = RANK_SHIFTS if args.rank_shifts is None else args.rank_shifts
    weight = PRIOR_WEIGHT if args.rank_prior_weight is None else args.rank_prior_weight
    results = compare_rankers(args.out, args.clip, *args.prompts, candidates=args.candidates,
                              scale=args.condition_scale, temperature=args.temperature, rank_shifts=shifts,
                              prior_weight=weight)
    print(f"Ranked with {len(shift_offsets(shifts))} CLIP view(s) per image (--rank-shifts {shifts}) and the prior's "
          f"log-likelihood at weight {weight} (--rank-prior-weight).\n")
    print("| CLIP | random all-correct | ranked-best all-correct | ranking gain (95% CI) | share of the room | "
          "oracle-best |\n|---|---|---|---|---|---|")
    for clip, summary in results.items():
        for name, s in ((clip, summary["all"]), (f"{clip} alone", summary.get("clip_alone", {}).get("all"))):
            if s:
                print(f"| {name} | {_fmt(s['random_all'])} | {_fmt(s['clip_best_all'])} | {fmt_gain(s)} | "
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

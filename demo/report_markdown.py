"""The demo report as Markdown: demo.evaluate.write_report measures, this renders what it measured."""
from __future__ import annotations

import math
from typing import Optional

# the oracle's attributes, in the order of the report's columns
ATTRIBUTES = ("background", "color", "shape", "size", "position")


def fmt(x: Optional[float], pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def fmt_gain(summary: dict) -> str:
    """A summary's ranking gain in points with its 95% interval, e.g. "+8.6 (+5.3 to +11.9)"."""
    return (f"{100 * summary['ranking_gain']:+.1f} ({100 * summary['ranking_gain_lo']:+.1f} to "
            f"{100 * summary['ranking_gain_hi']:+.1f})")


def render(report: dict) -> str:
    """report.json's content -> report.md."""
    from clip_rank.ranker import shift_offsets

    lines = ["# Demo report: text-to-image on the shapes set", "",
             f"Chosen: condition scale **{report['condition_scale']}**, temperature **{report['temperature']}** (best "
             f"CLIP-ranked all-correct over all prompts in the sweeps), {report['candidates']} candidates per prompt. "
             "The demo's last step stores them as the sampling defaults of the bundle it assembles: `python train.py "
             "bundle ... " + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in report.get("sampling", {}).items())
             + " --out OUT/bundle`.", "",
             "## Prompt fidelity (shapes oracle), chosen settings", "",
             f"Ranked by CLIP averaged over {len(shift_offsets(report['rank_shifts']))} shifted view(s) of each "
             f"image (generate.py --rank-shifts {report['rank_shifts']}).", "",
             "| split | prompts | random all-correct | ranked-best all-correct | ranking gain (95% CI) | "
             "share of the room | oracle-best (ceiling) |", "|---|---|---|---|---|---|---|"]
    chosen = report["chosen"]
    for split, s in chosen.items():
        lines.append(f"| {split} | {s['prompts']} | {fmt(s['random_all'])} | {fmt(s['clip_best_all'])} | "
                     f"{fmt_gain(s)} | {fmt(s.get('ranking_share'))} | {fmt(s['oracle_best_all'])} |")
    lines += ["", "Ranking gain: ranked-best minus random all-correct, in points; the interval is a bootstrap over "
              "prompts. Share of the room: the gain over its largest possible value, oracle-best minus random (n/a "
              "when every candidate is right or none is)."]
    one = report.get("chosen_one_view", {}).get("all")
    if one and report["rank_shifts"]:
        lines += ["", f"CLIP alone with one view per image (how the sweeps below rank): CLIP-best all-correct "
                  f"{fmt(one['clip_best_all'])}, ranking gain {100 * one['ranking_gain']:+.1f}."]
    lines += ["", "Per attribute, ranked best (random):", "", "| split | " + " | ".join(ATTRIBUTES) + " |",
              "|---|" + "---|" * len(ATTRIBUTES)]
    for split, s in chosen.items():
        cells = [f"{fmt(s[f'clip_best_{a}'])} ({fmt(s[f'random_{a}'])})" for a in ATTRIBUTES]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", f"## Condition-scale sweep at temperature {next(iter(report['temperature_sweep']))} (all prompts)", "",
              "| scale | random all-correct | CLIP-best all-correct (1 view) | oracle-best |", "|---|---|---|---|"]
    for scale, sw in report["sweep"].items():
        s = sw["all"]
        lines.append(f"| {scale} | {fmt(s['random_all'])} | {fmt(s['clip_best_all'])} | "
                     f"{fmt(s['oracle_best_all'])} |")
    lines += ["", f"## Temperature sweep at scale {report['condition_scale']} (all prompts)", "",
              "| temperature | random all-correct | CLIP-best all-correct (1 view) | oracle-best |", "|---|---|---|---|"]
    for t, sw in report["temperature_sweep"].items():
        s = sw["all"]
        lines.append(f"| {t} | {fmt(s['random_all'])} | {fmt(s['clip_best_all'])} | {fmt(s['oracle_best_all'])} |")
    if report.get("candidates_curve"):
        lines += ["", "## Candidates per prompt, chosen settings (the first k of each prompt's candidates)", "",
                  "| k | ranked-best seen | ranked-best held-out | ranked-best all | oracle-best all |",
                  "|---|---|---|---|---|"]
        for k, c in report["candidates_curve"].items():
            lines.append(f"| {k} | {fmt(c['seen']['clip_best_all'])} | {fmt(c['held_out']['clip_best_all'])} | "
                         f"{fmt(c['all']['clip_best_all'])} | {fmt(c['all']['oracle_best_all'])} |")
        lines += ["", "Where ranked-best flattens while oracle-best still climbs, the ranker, not the number of "
                  "candidates, is the limit."]
    r = report["reconstruction"]
    lines += ["", "## Components", "",
              f"- VQGAN reconstructions of {r['images']} val images: oracle all-correct {fmt(r['oracle_all_correct'])}"
              f" (the pipeline's ceiling), PSNR {r['psnr']:.2f} dB, codebook usage {fmt(r['codebook_usage'])}.",
              f"- Prior val loss: {fmt(report['prior'].get('val/loss'), pct=False)}; caption gain (val loss with empty "
              f"captions minus val loss; near 0: the prior ignores its captions): "
              f"{fmt(report['prior'].get('val/caption_gain'), pct=False)}.",
              "- CLIP val recall@1 text→image: " + fmt(report["clip"].get("val/t2i_R@1")) + ", image→text: "
              + fmt(report["clip"].get("val/i2t_R@1")) + ".", ""]
    if report.get("timings_s"):
        lines += ["## Stage times (s; stages run side by side overlap)", ""] + [
            f"- {k}: {v}" for k, v in report["timings_s"].items()] + [""]
    if report.get("caps_minutes"):
        lines += ["Training caps (minutes; the demo shortens a cap to end by its deadline): " + ", ".join(
            f"{k} {v:g}" for k, v in report["caps_minutes"].items()), ""]
    lines += ["![grid](grid.png)", "", "Rows: prompts, each written to the left of its row (seen first, then "
              "held-out); columns: its candidates as CLIP ranks them, best first, with the CLIP score under each.", ""]
    return "\n".join(lines)

"""`make demo`'s stages end to end on the tiny preset: shapes -> VQGAN -> code shards -> tokenizer -> prior -> CLIP
-> bundle -> generation report; a rerun reuses every finished stage."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "demo", "--preset", "tiny", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for path in ("shapes/manifest.json", "vqgan/export", "codes/train", "tokenizer/tokenizer.json",
                 "bart_prior/export", "clip_rank/export", "bundle/vqgan", "report/report.json", "report/report.md",
                 "report/grid.png", "report/report_details.json"):
        assert (out / path).exists(), path
    report = json.load(open(out / "report" / "report.json"))
    from demo.shapes import PRESETS

    assert set(report["sweep"]) == {str(s) for s in PRESETS["tiny"].scales}
    assert set(report["temperature_sweep"]) == {str(t) for t in PRESETS["tiny"].temperatures}
    check_choice_and_report(report, (out / "report" / "report.md").read_text())
    # the chosen settings go into the bundle the demo assembles last; the export it was evaluated on is untouched
    prior_config = json.load(open(out / "bundle" / "bart_prior" / "config.json"))
    assert (prior_config["condition_scale"], prior_config["temperature"]) == (report["condition_scale"],
                                                                              report["temperature"])
    assert report["sampling"] == {"condition_scale": report["condition_scale"], "temperature": report["temperature"]}
    assert json.load(open(out / "bundle" / "bundle.json"))["sampling"] == report["sampling"]
    exported = json.load(open(out / "bart_prior" / "export" / "config.json"))
    assert (exported["condition_scale"], exported["temperature"]) == (1.0, 1.0)  # PriorConfig's defaults
    for split in ("seen", "held_out", "all"):
        s = report["sweep"]["1.0"][split]
        assert 0 <= s["random_all"] <= s["oracle_best_all"] <= 1 and s["clip_best_all"] <= s["oracle_best_all"]
        assert abs(s["ranking_gain"] - (s["clip_best_all"] - s["random_all"])) < 1e-9
        assert s["ranking_gain_lo"] <= s["ranking_gain"] <= s["ranking_gain_hi"]
        room = s["oracle_best_all"] - s["random_all"]
        share = s["ranking_share"]
        assert share is None if room < 1e-9 else abs(share - s["ranking_gain"] / room) < 1e-9
    assert report["sweep"]["1.0"]["seen"]["prompts"] == 3 and report["sweep"]["1.0"]["held_out"]["prompts"] == 3
    assert report["reconstruction"]["images"] > 0 and report["reconstruction"]["psnr"] > 0
    assert report["prior"]["val/loss"] is not None and report["prior"]["val/caption_gain"] is not None
    assert report["timings_s"]["report"] > 0
    assert Image.open(out / "report" / "grid.png").size[0] > 32
    assert set(report["candidates_curve"]) == {"1", "2", "4"}  # tiny preset: 4 candidates
    assert report["candidates_curve"]["4"]["all"]["clip_best_all"] == report["chosen"]["all"]["clip_best_all"]
    # the chosen setting is ranked with the demo's shifted CLIP views, the sweeps with one view
    assert report["rank_shifts"] == PRESETS["tiny"].rank_shifts > 0
    assert report["chosen_one_view"] == report["temperature_sweep"][str(report["temperature"])]
    # two lanes side by side, one thread each (2 cores here): encode -> tokenizer -> prior, and CLIP; a log per stage
    assert "[encode -> tokenizer -> bart_prior | clip_rank]" in res.stdout
    assert "trainer.num_threads=" in res.stdout and "--threads" in res.stdout
    for name in ("bart_prior", "clip_rank"):
        assert "exported" in (out / "logs" / f"{name}.log").read_text()
    assert "code shards in" in (out / "logs" / "encode.log").read_text()

    # the same candidates ranked by CLIP exports given by folder: the bundle's own CLIP reproduces the report's sweep
    from demo.evaluate import compare_rankers, main as evaluate_main

    clips = [str(out / "bundle" / "clip_rank"), str(out / "clip_rank" / "export")]
    compared = compare_rankers(str(out), clips, 3, 3, candidates=4, scale=1.0, temperature=1.0)
    for clip in clips:
        for key in ("random_all", "clip_best_all", "oracle_best_all", "ranking_gain"):
            assert compared[clip]["all"][key] == report["sweep"]["1.0"]["all"][key], (clip, key)
    chosen = compare_rankers(str(out), clips[:1], 3, 3, candidates=4, scale=report["condition_scale"],
                             temperature=report["temperature"], rank_shifts=report["rank_shifts"])[clips[0]]
    assert chosen["candidates_curve"] == report["candidates_curve"]
    for key in ("random_all", "clip_best_all", "ranking_gain"):
        assert chosen["all"][key] == report["chosen"]["all"][key], key
    assert set(compared[clips[1]]["candidates_curve"]) == {"1", "2", "4"}
    assert evaluate_main(["--out", str(out), "--clip-rank", clips[0], "--prompts", "1", "1", "--candidates", "2"]) == 0
    assert "Candidates curve" in capsys.readouterr().out

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("done already") == 7


def check_choice_and_report(report: dict, markdown: str) -> None:
    """The demo's choice follows its rule and its report says what it measured: the chosen scale is the sweep's best
    CLIP-ranked all-correct (the smaller scale on a tie), the chosen temperature the temperature sweep's best (the
    higher on a tie); report.md is the rendering of report.json, and the bundle command it shows carries the chosen
    settings."""
    from demo.report_markdown import render

    sweep, t_sweep = report["sweep"], report["temperature_sweep"]
    best_scale = max(sweep, key=lambda s: (sweep[s]["all"]["clip_best_all"], -float(s)))
    best_t = max(t_sweep, key=lambda t: (t_sweep[t]["all"]["clip_best_all"], float(t)))
    assert (report["condition_scale"], report["temperature"]) == (float(best_scale), float(best_t))
    assert report["sampling"] == {"condition_scale": float(best_scale), "temperature": float(best_t)}
    assert markdown == render(report)
    command = re.search(r"`python train\.py bundle \.\.\. (.*?) --out OUT/bundle`", markdown)
    flags = command.group(1).split()
    assert dict(zip(flags[::2], map(float, flags[1::2]))) == {"--condition-scale": float(best_scale),
                                                              "--temperature": float(best_t)}


def _summary(clip_best: float) -> dict:
    keys = {f"{kind}_{a}": 0.5 for kind in ("clip_best", "random") for a in ("all", "background", "color", "shape",
                                                                              "size", "position")}
    return keys | {"prompts": 3, "clip_best_all": clip_best, "random_all": 0.25, "oracle_best_all": 1.0,
                   "ranking_gain": clip_best - 0.25, "ranking_gain_lo": 0.0, "ranking_gain_hi": 0.5,
                   "ranking_share": (clip_best - 0.25) / 0.75}


def _report(scale_scores: dict[str, float], temperature_scores: dict[str, float], scale: float,
            temperature: float) -> dict:
    def split(score):
        return {name: _summary(score) for name in ("seen", "held_out", "all")}

    return {"condition_scale": scale, "temperature": temperature,
            "sampling": {"condition_scale": scale, "temperature": temperature}, "rank_shifts": 1, "candidates": 4,
            "chosen": split(0.5), "chosen_one_view": split(0.5),
            "sweep": {s: split(v) for s, v in scale_scores.items()},
            "temperature_sweep": {t: split(v) for t, v in temperature_scores.items()},
            "candidates_curve": {}, "reconstruction": {"images": 4, "oracle_all_correct": 1.0, "psnr": 30.0,
                                                       "codebook_usage": 0.5},
            "prior": {"val/loss": 1.0, "val/caption_gain": 0.1}, "clip": {}, "timings_s": {}}


def test_report_check_accepts_the_rule_and_catches_a_wrong_choice_or_a_stale_report():
    from demo.report_markdown import render

    good = _report({"1.0": 0.4, "2.0": 0.6, "3.0": 0.6}, {"1.0": 0.5, "0.7": 0.5}, scale=2.0, temperature=1.0)
    check_choice_and_report(good, render(good))
    for wrong in (dict(condition_scale=3.0), dict(condition_scale=1.0), dict(temperature=0.7)):
        bad = good | wrong
        bad["sampling"] = {k: bad[k] for k in ("condition_scale", "temperature")}
        with pytest.raises(AssertionError):
            check_choice_and_report(bad, render(bad))
    with pytest.raises(AssertionError):  # a report.md left from another report.json
        check_choice_and_report(good, render(good | {"temperature_sweep": {"1.0": good["sweep"]["1.0"]}}))


def _prompt(best_correct: bool, correct: int, of: int = 4) -> dict:
    return {"clip_best": 0, "candidates": [{"all": best_correct}] + [{"all": i < correct} for i in range(of - 1)]}


def test_ranking_gain_and_its_bootstrap_interval():
    from demo.evaluate import ranking_gain

    # every prompt: the CLIP pick is right, 2 of 4 candidates are -> +50 points, no spread
    assert ranking_gain([_prompt(True, 1)] * 10) == (0.5, 0.5, 0.5)
    # half the prompts +75, half -25 (the pick is the one wrong candidate): mean +25, an interval around it
    gain, lo, hi = ranking_gain([_prompt(True, 0), _prompt(False, 1)] * 20)
    assert abs(gain - 0.25) < 1e-12 and 0.05 < lo < 0.25 < hi < 0.45
    # more prompts, narrower interval
    _, lo2, hi2 = ranking_gain([_prompt(True, 0), _prompt(False, 1)] * 200)
    assert hi2 - lo2 < (hi - lo) / 2


def test_room_share_is_the_gain_over_its_largest_possible_value():
    from demo.evaluate import room_share

    assert room_share(0.6, 0.8, 1.0) == pytest.approx(0.5)  # +20 points of a possible +40
    assert room_share(0.86, 0.95, 1.0) == pytest.approx(0.09 / 0.14)
    assert room_share(0.6, 0.5, 1.0) == pytest.approx(-0.25)  # a ranker worse than chance
    assert room_share(1.0, 1.0, 1.0) is None and room_share(0.0, 0.0, 0.0) is None  # no room: nothing to rank


def test_candidates_curve_ranks_within_the_first_k():
    from demo.evaluate import candidates_curve

    # prompt 1: only candidate 2 is right and CLIP likes it best; prompt 2 (held out): candidate 0 is right, but CLIP
    # prefers candidate 3 once it is drawn
    rows = [{"held_out": False, "clip_scores": [0.1, 0.2, 0.9, 0.0], "candidates": [{"all": i == 2} for i in range(4)]},
            {"held_out": True, "clip_scores": [0.5, 0.1, 0.2, 0.8], "candidates": [{"all": i == 0} for i in range(4)]}]
    curve = candidates_curve(rows, [1, 2, 3, 4])
    assert [curve[k]["seen"]["clip_best_all"] for k in "1234"] == [0.0, 0.0, 1.0, 1.0]
    assert [curve[k]["held_out"]["clip_best_all"] for k in "1234"] == [1.0, 1.0, 1.0, 0.0]
    assert [curve[k]["all"]["oracle_best_all"] for k in "1234"] == [0.5, 0.5, 1.0, 1.0]


def test_time_scale_multiplies_the_training_caps():
    from demo.shapes import PRESETS, max_time, stages

    assert max_time(10) == "00:00:10:00" and max_time(22.5) == "00:00:22:30" and max_time(60 * 25 + 0.5) == "01:01:00:30"

    def caps(scale):
        found = {}
        for name, _, commands in stages("/tmp/x", PRESETS["full"], scale):
            for cmd in commands:
                found.update({name: a.split("=", 1)[1] for a in cmd if a.startswith("trainer.max_time=")})
        return found

    minutes = PRESETS["full"].minutes
    assert caps(1.0) == {stage: max_time(m) for stage, m in minutes.items()}
    assert caps(2.5) == {stage: max_time(2.5 * m) for stage, m in minutes.items()}
    tiny = [" ".join(c) for _, _, commands in stages("/tmp/x", PRESETS["tiny"]) for c in commands]
    assert tiny and not any("max_time" in c for c in tiny)  # the tiny preset stops by steps only


def test_lanes_split_the_cores_run_in_order_and_report_a_failure(tmp_path, capsys):
    import pytest

    from demo.shapes import _run_lanes

    show = "import os, sys, time; print(os.environ['OMP_NUM_THREADS'], sys.argv[-1], time.time())"
    lanes = [[("first", [[sys.executable, "-c", show, "a"]]), ("second", [[sys.executable, "-c", show, "b"]])],
             [("bad", [[sys.executable, "-c", show + "; print('boom'); sys.exit(3)"]]),
              ("after_bad", [[sys.executable, "-c", show]])]]
    with pytest.raises(subprocess.CalledProcessError, match="bad"):
        _run_lanes(lanes, str(tmp_path / "logs"))
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    first, second = ((tmp_path / "logs" / f"{n}.log").read_text().splitlines()[-1].split() for n in ("first", "second"))
    assert first[:2] == [threads, "a"] and second[:2] == [threads, "b"]
    assert float(first[2]) < float(second[2])  # a lane runs its stages in order
    assert not (tmp_path / "logs" / "after_bad.log").exists()  # a failure ends its lane
    err = capsys.readouterr().err
    assert "boom" in err and "bad.log" in err and "first.log" not in err


def test_with_threads_shows_the_thread_count_where_a_command_takes_one():
    from demo.shapes import _with_threads

    assert _with_threads(["py", "train.py", "clip"], 1)[-1] == "trainer.num_threads=1"
    assert _with_threads(["py", "-m", "vqgan.encode", "--model", "m"], 2)[-2:] == ["--threads", "2"]
    assert _with_threads(["touch", "x"], 1) == ["touch", "x"]


def test_a_late_training_stage_is_shortened_to_end_by_the_deadline():
    from demo.shapes import MIN_CAP_S, STAGE_OVERHEAD_S, fit_to_deadline

    cmd = ["py", "train.py", "clip", "--config", "c.yaml", "trainer.max_time=00:00:13:30", "trainer.num_threads=1"]
    now = 1000.0
    # plenty of time left: the cap stands
    assert fit_to_deadline(cmd, now + 3600, now) == (cmd, "")
    assert fit_to_deadline(cmd, None, now) == (cmd, "")
    # 10 minutes left: the stage gets them minus its start-up/export overhead, every other argument kept in place
    fitted, note = fit_to_deadline(cmd, now + 600, now)
    left = 600 - STAGE_OVERHEAD_S
    assert fitted == cmd[:5] + [f"trainer.max_time=00:00:{left // 60:02d}:{left % 60:02d}", cmd[6]]
    assert "13.5 -> 9.5 min" in note
    # past the deadline: the minimum cap, said so
    fitted, note = fit_to_deadline(cmd, now - 100, now)
    assert fitted[5] == f"trainer.max_time=00:00:{MIN_CAP_S // 60:02d}:00" and "already past" in note
    # commands without a cap are never touched
    assert fit_to_deadline(["py", "-m", "vqgan.encode"], now - 100, now) == (["py", "-m", "vqgan.encode"], "")


def test_budget_must_leave_room_for_the_report():
    import pytest

    from demo.shapes import PRESETS, main

    with pytest.raises(SystemExit):
        main(["--budget", str(PRESETS["full"].reserve_minutes), "--out", "/nonexistent/x"])
    with pytest.raises(SystemExit):
        main(["--budget", "-1", "--out", "/nonexistent/x"])

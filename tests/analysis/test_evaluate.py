"""Evaluator CLI on a tiny trained checkpoint: returns.json/csv on the grid, random-policy
references in the normalize.py format, and clear errors for bad input."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from tests.helpers import smoke_run
from dali_jax.analysis import evaluate as ev
from dali_jax.analysis.normalize import load_reference, load_run_result
from dali_jax.analysis.policy_eval import EvaluateError, evaluate_run, select_contexts
from dali_jax.envs import contexts as C


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return smoke_run(tmp_path_factory)


def _err(capsys, argv):
    assert ev.main(argv) == 2
    return capsys.readouterr().err


def test_evaluator_writes_grid_results_readable_by_the_report(run_dir, tmp_path, capsys):
    ref = tmp_path / "random.json"
    # random-policy references on three contexts, two seeds
    assert ev.main(["--random", "--task", "ball_in_cup", "--out", str(ref), "--episodes", "1",
                    "--seeds", "2", "--episode-length", "10", "--contexts", "0,7,20",
                    "--num-envs", "3", "--quiet"]) == 0
    r = load_reference(ref, kind="random", task="ball_in_cup")
    assert len(r.entries) == 3
    for e in r.entries:
        assert len(e["seed_returns"]) == 2 and e["return"] == max(e["seed_returns"])
        assert 0 <= e["return"] <= 10

    assert ev.main(["--logdir", run_dir, "--episodes", "1", "--episode-length", "10",
                    "--num-envs", "84", "--serial", "--random-reference", str(ref)]) == 0
    out = capsys.readouterr().out
    for regime in ("interpolation", "extrapolation", "mixed"):  # double_box scores all three
        assert regime in out
    res = load_run_result(run_dir)
    grid = C.evaluation_grid("ball_in_cup")
    assert len(res.contexts) == len(grid) == 84
    assert [c.index for c in res.contexts] == list(range(84))
    assert (res.task, res.method, res.setting, res.obs, res.seed) == (
        "ball_in_cup", "dali_d", "double_box", "features", 0)
    for c, g in zip(res.contexts, grid):
        assert c.values == g.values and len(c.returns) == 1 and 0 <= c.returns[0] <= 10
    raw = json.load(open(os.path.join(run_dir, "eval", "returns.json")))
    assert raw["episodes"] == 1 and raw["episode_length"] == 10 and "train_context" not in raw
    assert raw["alignment"]["recipe"] == "paper" and "alignment: recipe=paper" in out
    rows = list(csv.DictReader(open(os.path.join(run_dir, "eval", "returns.csv"))))
    assert len(rows) == 84
    assert set(rows[0]) >= {"index", "gravity", "string_length", "kind", "regime", "mean",
                            "std", "n", "random_return", "score"}
    counts = {g: sum(r["regime"] == g for r in rows) for g in C.REGIMES}
    assert counts == {"interpolation": 13, "extrapolation": 30, "mixed": 41}
    scored = [r for r in rows if r["score"]]
    assert len(scored) == 3  # the contexts the random file covers
    for r in scored:  # ball_in_cup: expert 1000
        rr = float(r["random_return"])
        assert float(r["score"]) == pytest.approx((float(r["mean"]) - rr) / (1000 - rr),
                                                  rel=1e-4, abs=1e-6)


def test_scored_subset_and_specific_runs(run_dir, tmp_path):
    # a copy of the run presented as a "specific" (expert) run at gravity 2.45
    spec_dir = tmp_path / "specific"
    shutil.copytree(run_dir, spec_dir, ignore=shutil.ignore_patterns("eval"))
    cfg = json.load(open(spec_dir / "config.json"))
    cfg["context_setting"] = "specific"
    cfg["specific_context"] = {"factor_0": 2.45, "factor_1": -1.0}
    json.dump(cfg, open(spec_dir / "config.json", "w"))
    res = evaluate_run(str(spec_dir), episodes=1, episode_length=5, num_envs=2,
                       contexts="2,20", parallel=False)
    assert res["train_context"] == {"gravity": 2.45, "string_length": 0.3}
    assert [c["index"] for c in res["contexts"]] == [2, 20]
    assert all(c["regime"] is None for c in res["contexts"])  # specific scores nothing
    ev.write_results(str(spec_dir), res)
    assert load_run_result(spec_dir).train_context == {"gravity": 2.45, "string_length": 0.3}
    rows = ev.regime_summary(res)
    assert rows[0]["group"] == "train context" and rows[0]["n"] == 1
    text = ev._format_summary(res, rows).splitlines()  # short: every context listed
    for c, line in zip(res["contexts"], text[1:3]):
        assert f"gravity {c['values']['gravity']:g}" in line and "- " in line
        assert f"return {np.mean(c['returns']):7.1f}" in line
    assert text[3].strip().startswith("train context")
    short = ev._format_summary(res, rows, max_listed=1).splitlines()
    assert len(short) == 2 + len(rows)  # header, regimes, how g_phi was trained
    assert short[-1] == ("  alignment: recipe=paper loss=forward residual=False "
                         "standardize=False loss_scale=1.0 window=8 "
                         "gphi_width=16 head_units=16")
    # "scored" for single_0 = the 14 non-default gravity singles
    sel = select_contexts("ball_in_cup", "scored", "single_0")
    assert len(sel) == 14 and all(g.kind == "single_0" for g in sel)
    with pytest.raises(EvaluateError, match="scores no grid context"):
        select_contexts("ball_in_cup", "scored", "specific")


def test_bad_input_gives_clear_errors(run_dir, tmp_path, capsys):
    assert "no such run directory" in _err(capsys, ["--logdir", str(tmp_path / "nope")])
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), empty / "config.json")
    assert "has no checkpoint" in _err(capsys, ["--logdir", str(empty)])
    assert "no config.json" in _err(capsys, ["--logdir", str(tmp_path)])
    assert "is a ball_in_cup run, not walker" in _err(
        capsys, ["--logdir", run_dir, "--task", "walker"])
    msg = _err(capsys, ["--logdir", run_dir, "--contexts", "3,84"])
    assert "[84] out of range" in msg and "0..83" in msg
    assert "--episodes must be a positive integer" in _err(
        capsys, ["--logdir", run_dir, "--episodes", "0"])
    assert "reference-return file not found" in _err(
        capsys, ["--logdir", run_dir, "--random-reference", str(tmp_path / "missing.json")])
    assert "--random needs --task" in _err(capsys, ["--random", "--out", "x.json"])
    assert "--random needs --out" in _err(capsys, ["--random", "--task", "ball_in_cup"])
    assert "--task must be one of" in _err(
        capsys, ["--random", "--task", "cartpole", "--out", str(tmp_path / "r.json")])
    assert "--logdir RUN is required" in _err(capsys, [])
    with pytest.raises(SystemExit):
        ev.main(["--logdir", run_dir, "--mode", "greedy"])
    assert not os.path.exists(tmp_path / "r.json")

"""Normalisation, regime matrices and the ``python -m dali_jax.report`` command."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_run
from dali_jax.analysis import normalize as NZ
from dali_jax.analysis import report as RP
from dali_jax.analysis.expert_contexts import expert_contexts, minmax_ranges, nearest_expert
from dali_jax.analysis.plots import context_grid
from dali_jax.analysis.score_matrix import (POOLED_SETTINGS, expert_reference_from_runs,
                                            regime_matrices)
from dali_jax.envs import contexts

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_COUNTS = {  # docs/protocol.md: setting -> regime -> number of scored contexts
    "single_0": {"interpolation": 4, "extrapolation": 10},
    "single_1": {"interpolation": 4, "extrapolation": 9},
    "double_box": {"interpolation": 13, "extrapolation": 30, "mixed": 41},
}


# ----------------------------------------------------------------------------- regimes
@pytest.mark.parametrize("task", ["ball_in_cup", "walker"])
def test_regime_bucketing_matches_protocol(task):
    grid = contexts.evaluation_grid(task)
    assert len(grid) == 84
    for setting, want in PROTOCOL_COUNTS.items():
        got = {}
        for g in grid:
            r = contexts.regime(task, setting, g.values)
            if r is not None:
                got[r] = got.get(r, 0) + 1
        assert got == want, setting


def test_pooled_matrices_have_protocol_sizes(tmp_path):
    runs = [NZ.load_run_result(write_run(tmp_path, setting=s, seed=seed))
            for s in POOLED_SETTINGS for seed in (0, 1)]
    norm = NZ.Normalizer("ball_in_cup", assume_random_zero=True)
    mats = regime_matrices(runs, norm)
    assert {g: m.scores.shape for g, m in mats.items()} == {
        "interpolation": (2, 4 + 4 + 13), "extrapolation": (2, 10 + 9 + 30), "mixed": (2, 41)}
    np.testing.assert_allclose(mats["mixed"].scores, 0.5)
    assert all(c[0] == "double_box" for c in mats["mixed"].columns)


# ----------------------------------------------------------------------------- normalisation
def test_expert_contexts():
    for task, (lo, hi) in (("ball_in_cup", (0.09, 0.54)), ("walker", (0.3, 1.8))):
        f0, f1 = contexts.FACTORS[task]
        ex = expert_contexts(task)
        keys = {(round(c[f0], 6), round(c[f1], 6)) for c in ex}
        # docs/protocol.md lists 9 + 8 + 4 = 21, with the default context in both lists
        assert len(ex) == len(keys) == 20
        assert {(2.45, lo), (17.64, lo), (17.64, hi), (2.45, hi)} <= keys
        grid = {(round(g.values[f0], 6), round(g.values[f1], 6))
                for g in contexts.evaluation_grid(task)}
        assert keys <= grid


def test_nearest_expert_hand_example():
    experts = [{"a": 0.0, "b": 0.0}, {"a": 10.0, "b": 1.0}, {"a": 0.0, "b": 1.0}]
    ranges = {"a": (0.0, 10.0), "b": (0.0, 1.0)}
    # scaled point (0.6, 0.1): distances 0.608, 0.985, 1.082 -> expert 0
    assert nearest_expert({"a": 6.0, "b": 0.1}, experts, ranges) == 0
    # without scaling, expert 1 would be nearest (raw distances 6.0 vs 4.1)
    assert nearest_expert({"a": 6.0, "b": 0.1}, experts, {"a": (0, 1), "b": (0, 1)}) == 1
    assert nearest_expert({"a": 1.0, "b": 0.9}, experts, ranges) == 2
    # min-max ranges come from the evaluated contexts
    assert minmax_ranges(experts + [{"a": -2.0, "b": 0.5}], ("a", "b")) == {
        "a": (-2.0, 10.0), "b": (0.0, 1.0)}


def _walker_refs():
    names = contexts.FACTORS["walker"]
    ex = expert_contexts("walker")
    expert = NZ.ReferenceReturns("walker", "expert", names, [
        {"values": c, "return": 100.0 + 10 * i} for i, c in enumerate(ex)])
    random = NZ.ReferenceReturns("walker", "random", names, [
        {"values": g.values, "return": 20.0} for g in contexts.evaluation_grid("walker")])
    return ex, expert, random


def test_nearest_expert_normalisation_walker():
    ex, expert, random = _walker_refs()
    norm = NZ.Normalizer("walker", random, expert)
    idx = {(c["gravity"], c["actuator_strength"]): i for i, c in enumerate(ex)}
    # gravity 7.35 is 2.45 from 4.9 and 2.46 from 9.81 (scaling over [0.98, 19.6] keeps order)
    for ctx, nearest in [((7.35, 1.0), (4.9, 1.0)), ((12.25, 1.0), (9.81, 1.0)),
                         ((2.45, 0.1), (2.45, 0.3)), ((15.68, 2.0), (17.64, 1.8))]:
        v = {"gravity": ctx[0], "actuator_strength": ctx[1]}
        assert norm.expert_context(v) == dict(zip(("gravity", "actuator_strength"), nearest))
        r_exp = 100.0 + 10 * idx[nearest]
        assert norm.score(300.0, v) == pytest.approx((300.0 - 20.0) / (r_exp - 20.0))


def test_normalized_score_and_ball_in_cup_fixed_expert():
    assert NZ.normalized_score(500.0, 100.0, 900.0) == pytest.approx(0.5)
    np.testing.assert_allclose(NZ.normalized_score(np.array([0.0, 1000.0]), 0.0, 1000.0), [0, 1])
    with pytest.raises(ValueError, match="exceed"):
        NZ.normalized_score(1.0, 5.0, 5.0)
    v = {"gravity": 17.64, "string_length": 0.03}
    assert NZ.Normalizer("ball_in_cup", assume_random_zero=True).score(250.0, v) == 0.25
    names = contexts.FACTORS["ball_in_cup"]
    rnd = NZ.ReferenceReturns("ball_in_cup", "random", names, [{"values": v, "return": 100.0}],
                             source="rand.json")
    norm = NZ.Normalizer("ball_in_cup", rnd)
    assert norm.score(250.0, v) == pytest.approx(150.0 / 900.0)
    with pytest.raises(KeyError, match="rand.json"):
        norm.score(250.0, {"gravity": 9.81, "string_length": 0.3})


def test_normalizer_requires_references():
    with pytest.raises(ValueError, match="assume-random-zero"):
        NZ.Normalizer("ball_in_cup")
    with pytest.raises(ValueError, match="--expert"):
        NZ.Normalizer("walker", assume_random_zero=True)


def test_reference_roundtrip_and_bad_files(tmp_path):
    names = contexts.FACTORS["walker"]
    ref = NZ.ReferenceReturns.from_seed_returns(
        "walker", "random", names, [({"gravity": 9.81, "actuator_strength": 1.0}, [31.0, 33.0])])
    p = tmp_path / "refs" / "random.json"
    NZ.save_reference(p, ref)
    back = NZ.load_reference(p, kind="random", task="walker")
    assert back.lookup({"gravity": 9.81, "actuator_strength": 1.0}) == 33.0
    with pytest.raises(NZ.ReferenceFileError, match="random.json.*expert"):
        NZ.load_reference(p, kind="expert")
    with pytest.raises(NZ.ReferenceFileError, match="random.json.*ball_in_cup"):
        NZ.load_reference(p, task="ball_in_cup")
    good = json.loads(p.read_text())
    bad_bodies = {
        "notjson.json": "{not json",
        "list.json": "[]",
        "format.json": json.dumps({**good, "format": "other"}),
        "noentries.json": json.dumps({**good, "entries": []}),
        "noreturn.json": json.dumps(
            {**good, "entries": [{"values": good["entries"][0]["values"]}]}),
        "nan.json": json.dumps({**good, "entries": [{"values": {"gravity": 1.0},
                                                     "return": 3.0}]}),
        "dup.json": json.dumps({**good, "entries": good["entries"] * 2}),
    }
    for name, body in bad_bodies.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(NZ.ReferenceFileError, match=name):
            NZ.load_reference(tmp_path / name)
    with pytest.raises(NZ.ReferenceFileError, match="missing.json"):
        NZ.load_reference(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- run results
def test_regime_matrices_values_and_seed_order(tmp_path):
    ret = lambda v, s: 100.0 * s + v["gravity"]  # noqa: E731
    runs = [NZ.load_run_result(write_run(tmp_path, setting=s, seed=seed, ret=ret))
            for s in ("single_0", "double_box") for seed in (7, 3)]
    mats = regime_matrices(runs, NZ.Normalizer("ball_in_cup", assume_random_zero=True))
    m = mats["extrapolation"]
    assert m.seeds == {"single_0": (3, 7), "double_box": (3, 7)}
    want = np.array([[(100.0 * s + v["gravity"]) / 1000.0 for v in m.values] for s in (3, 7)])
    np.testing.assert_allclose(m.scores, want)
    assert m.scores.shape == (2, 10 + 30)
    assert set(mats) == {"interpolation", "extrapolation", "mixed"}


def test_regime_matrices_bad_input(tmp_path):
    norm = NZ.Normalizer("ball_in_cup", assume_random_zero=True)
    a = NZ.load_run_result(write_run(tmp_path / "a", setting="single_0", seed=0))
    b = NZ.load_run_result(write_run(tmp_path / "b", setting="single_0", seed=0))
    c = NZ.load_run_result(write_run(tmp_path / "c", setting="double_box", seed=1))
    d = NZ.load_run_result(write_run(tmp_path / "d", setting="double_box", seed=2))
    with pytest.raises(NZ.RunResultError, match="seed 0"):
        regime_matrices([a, b], norm)
    with pytest.raises(ValueError, match="numbers of seeds"):
        regime_matrices([a, c, d], norm)
    e = NZ.load_run_result(write_run(tmp_path / "e", setting="double_box", seed=3, drop=(20,)))
    with pytest.raises(NZ.RunResultError, match="missing 1 context"):
        regime_matrices([e], norm)
    w = NZ.load_run_result(write_run(tmp_path / "w", task="walker", setting="double_box"))
    with pytest.raises(NZ.RunResultError, match="task 'walker'"):
        regime_matrices([c, w], norm)


def test_load_run_result_bad_files(tmp_path):
    with pytest.raises(NZ.RunResultError, match="returns.json.*not found"):
        NZ.load_run_result(tmp_path / "nothing")
    good = json.loads((write_run(tmp_path) / "eval" / "returns.json").read_text())
    bodies = {
        "syntax": "{\"task\": ",
        "noseed": {k: v for k, v in good.items() if k != "seed"},
        "obs": {**good, "obs": "rgb"},
        "task": {**good, "task": "cheetah"},
        "returns": {**good, "contexts": [{**good["contexts"][0], "returns": []}]},
        "values": {**good, "contexts": [{**good["contexts"][0], "values": {"gravity": 1.0}}]},
        "dupidx": {**good, "contexts": good["contexts"][:1] * 2},
    }
    for name, body in bodies.items():
        p = tmp_path / f"{name}.json"
        p.write_text(body if isinstance(body, str) else json.dumps(body))
        with pytest.raises(NZ.RunResultError, match=f"{name}.json"):
            NZ.load_run_result(p)


def test_expert_reference_from_runs(tmp_path):
    tc = {"gravity": 2.45, "actuator_strength": 0.3}
    runs = [NZ.load_run_result(write_run(tmp_path, task="walker", setting="specific", seed=s,
                                        ret=lambda v, s: 100.0 + s, train_context=tc))
            for s in (0, 4)]
    ref = expert_reference_from_runs(runs)
    assert ref.kind == "expert" and ref.lookup(tc) == 104.0
    with pytest.raises(NZ.RunResultError, match="train_context"):
        expert_reference_from_runs([NZ.load_run_result(write_run(tmp_path, task="walker"))])


def test_context_grid_places_singles_on_default_row_and_column():
    grid = contexts.evaluation_grid("walker")
    names = contexts.FACTORS["walker"]
    xs, ys, z = context_grid([g.values for g in grid], [g.index for g in grid], names,
                             contexts.DEFAULTS["walker"])
    assert z.shape == (8, 9) and np.isfinite(z).all()  # 56 pairs + 9 + 7 singles = 72
    ix, iy = list(xs).index(9.81), list(ys).index(1.0)
    assert z[iy, ix] == 7  # the default context: 8th of the gravity singles (ascending)
    assert z[list(ys).index(0.1), ix] == next(
        g.index for g in grid if g.values == {"gravity": 9.81, "actuator_strength": 0.1})


# ----------------------------------------------------------------------------- report
def _method_runs(root, task="ball_in_cup", seeds=(0, 1, 2)):
    out = []
    for method, base in (("dali", 700.0), ("crssm", 500.0)):
        for s in POOLED_SETTINGS:
            for seed in seeds:
                out.append(write_run(root, task=task, method=method, setting=s, seed=seed,
                                     ret=lambda v, sd, b=base: b + 30 * sd - 10 * v["gravity"]))
    return out


def test_build_report_is_reproducible(tmp_path):
    runs = RP.load_runs(_method_runs(tmp_path))
    norm = NZ.Normalizer("ball_in_cup", assume_random_zero=True)
    a = RP.build_report(runs, norm, reps=300, seed=5)
    b = RP.build_report(runs, norm, reps=300, seed=5)
    assert a.aggregates == b.aggregates and a.poi == b.poi
    assert set(a.aggregates) == {"interpolation", "extrapolation", "mixed"}
    # dali beats crssm on every context of every seed: P(crssm > dali) = 0
    assert a.poi["mixed"][("crssm", "dali")][0].as_tuple() == (0.0, 0.0, 0.0)


def test_notes_and_text_name_only_the_settings_the_runs_have(tmp_path):
    """A study of single_0 alone: the summary says it pools single_0 only and notes no
    missing setting; a method lacking a setting another method has gets a note."""
    one = [write_run(tmp_path / "a", method=m, setting="single_0", seed=s)
           for m in ("dali", "crssm") for s in (0, 1)]
    norm = NZ.Normalizer("ball_in_cup", assume_random_zero=True)
    rep = RP.build_report(RP.load_runs(one), norm, reps=200, seed=0)
    assert rep.notes == []
    assert "pooled over the runs' settings (single_0);" in RP._markdown(rep, [])
    both = one + [write_run(tmp_path / "b", method="dali", setting="single_1", seed=s)
                  for s in (0, 1)]
    rep = RP.build_report(RP.load_runs(both), norm, reps=200, seed=0)
    assert rep.notes[0] == "crssm: no runs for setting(s) ['single_1']; its matrices pool the others."
    assert len(rep.notes) == 1 or "shared" in rep.notes[1]
    assert "(single_0, single_1);" in RP._markdown(rep, [])


def test_report_cli_end_to_end(tmp_path):
    dirs = _method_runs(tmp_path / "runs")
    names = contexts.FACTORS["ball_in_cup"]
    rand = NZ.ReferenceReturns("ball_in_cup", "random", names, [
        {"values": g.values, "return": 10.0} for g in contexts.evaluation_grid("ball_in_cup")])
    NZ.save_reference(tmp_path / "random.json", rand)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "dali_jax.report", *map(str, dirs), "--out", str(out),
         "--reps", "300", "--seed", "1", "--random", str(tmp_path / "random.json")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out / "summary.md").read_text()
    assert "IQM" in md and "random.json" in md and "| crssm | dali |" in md
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 3 * 2 * 4 + 3  # regimes x methods x metrics + one pair per regime
    iqm = {(r["regime"], r["method"]): float(r["estimate"]) for r in rows if r["metric"] == "iqm"}
    assert iqm[("mixed", "dali")] > iqm[("mixed", "crssm")]
    pngs = sorted(out.glob("*.png"))
    assert (out / "iqm_bars.png") in pngs and len(pngs) == 1 + 2 * 3
    assert all(p.stat().st_size > 1000 for p in pngs)


def _main_err(argv, capsys):
    assert RP.main(argv) == 2
    return capsys.readouterr().err


def test_report_cli_bad_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no run directories" in _main_err(["--out", out], capsys)
    a = write_run(tmp_path, setting="single_0")
    w = write_run(tmp_path, task="walker", setting="single_0")
    err = _main_err([str(a), str(w), "--out", out, "--assume-random-zero"], capsys)
    assert "walker" in err and str(w / "eval" / "returns.json") in err
    bad = tmp_path / "bad"
    (bad / "eval").mkdir(parents=True)
    (bad / "eval" / "returns.json").write_text("{oops")
    err = _main_err([str(a), str(bad), "--out", out, "--assume-random-zero"], capsys)
    assert str(bad / "eval" / "returns.json") in err and "JSON" in err
    err = _main_err([str(a), "--out", out], capsys)
    assert "random-policy returns missing" in err and "--assume-random-zero" in err
    err = _main_err([str(w), "--out", out, "--assume-random-zero"], capsys)
    assert "--expert" in err
    err = _main_err([str(a), "--out", out, "--random", str(tmp_path / "nope.json")], capsys)
    assert "nope.json" in err
    assert not Path(out).exists()


def test_report_assume_random_zero_is_stated(tmp_path, capsys):
    dirs = [write_run(tmp_path, setting="single_1", seed=s) for s in (0, 1)]
    out = tmp_path / "out"
    assert RP.main([*map(str, dirs), "--out", str(out), "--reps", "50", "--assume-random-zero",
                   "--no-plots"]) == 0
    md = (out / "summary.md").read_text()
    assert "R_random = 0 ASSUMED" in md and "settings (single_1);" in md
    assert not list(out.glob("*.png"))

"""Context factors, sets, RoundRobin, evaluation grid and regimes (docs/protocol.md)."""
import collections
import math

import numpy as np
import pytest

from dali_jax.envs import contexts as C

TASKS = ("ball_in_cup", "walker")


def test_factors_defaults_ranges():
    assert C.TASKS == TASKS
    assert C.FACTORS == {"ball_in_cup": ("gravity", "string_length"),
                         "walker": ("gravity", "actuator_strength")}
    assert C.DEFAULTS["ball_in_cup"] == {"gravity": 9.81, "string_length": 0.3}
    assert C.DEFAULTS["walker"] == {"gravity": 9.81, "actuator_strength": 1.0}
    assert C.train_range("ball_in_cup", "gravity") == (4.9, 14.7)
    assert C.train_range("walker", "gravity") == (4.9, 14.7)
    assert C.train_range("ball_in_cup", "string_length") == (0.15, 0.45)
    assert C.train_range("walker", "actuator_strength") == (0.5, 1.5)
    with pytest.raises(ValueError, match="string_length"):
        C.train_range("walker", "string_length")


@pytest.mark.parametrize("task", TASKS)
def test_normalize_context(task):
    f0, f1 = C.FACTORS[task]
    lo0, hi0 = C.train_range(task, f0)
    lo1, hi1 = C.train_range(task, f1)
    c = C.normalize_context(task, {f0: lo0, f1: hi1})
    assert c.dtype == np.float32 and c.shape == (2,)
    np.testing.assert_allclose(c, [-1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(C.normalize_context(task, {f0: hi0, f1: lo1}), [1, -1], atol=1e-6)
    mid = C.normalize_context(task, {})  # defaults
    np.testing.assert_allclose(mid[0], 2 * (9.81 - 4.9) / 9.8 - 1, atol=1e-6)
    np.testing.assert_allclose(mid[1], 0.0, atol=1e-6)  # both factor-1 defaults are centred
    # Extrapolation values fall outside [-1, 1]; the inverse recovers the values.
    c = C.normalize_context(task, {f0: 19.6, f1: 2 * hi1})
    assert c[0] > 1 and c[1] > 1
    back = C.denormalize_context(task, c)
    assert math.isclose(back[f0], 19.6, rel_tol=1e-6)


def test_validate_context_fills_and_accepts():
    assert C.validate_context("ball_in_cup", {"gravity": 3}) == {"gravity": 3.0,
                                                                  "string_length": 0.3}
    out = C.validate_context("walker", {"wind_x": -2.0, "timestep": 0.005})
    assert out == {"gravity": 9.81, "actuator_strength": 1.0, "wind_x": -2.0, "timestep": 0.005}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_walker_accepts_every_carl_feature():
    from dali_jax.envs.carl_dmc import import_carl_dmc
    CARLDmcWalkerEnv = import_carl_dmc().CARLDmcWalkerEnv
    carl = CARLDmcWalkerEnv.get_context_features()
    ours = C.FEATURES["walker"]
    assert set(carl) == set(ours)
    for name, feat in carl.items():
        assert ours[name][0] == feat.default_value, name
    # every CARL default passes validation
    C.validate_context("walker", {n: f.default_value for n, f in carl.items()})


@pytest.mark.parametrize("task,values,feature,rng", [
    ("ball_in_cup", {"string_length": 0.0}, "string_length", "(0, 0.9]"),
    ("ball_in_cup", {"string_length": -0.1}, "string_length", "(0, 0.9]"),
    ("ball_in_cup", {"string_length": 1.5}, "string_length", "(0, 0.9]"),
    ("ball_in_cup", {"gravity": -1.0}, "gravity", "[0, inf)"),
    ("walker", {"gravity": float("nan")}, "gravity", "[0, inf)"),
    ("walker", {"actuator_strength": float("inf")}, "actuator_strength", "[0, inf)"),
    ("walker", {"actuator_strength": -0.5}, "actuator_strength", "[0, inf)"),
    ("walker", {"geom_density": 0.0}, "geom_density", "(0, inf)"),
    ("walker", {"timestep": 0.2}, "timestep", "[0.001, 0.025]"),
    ("walker", {"timestep": 0.003}, "timestep", "[0.001, 0.025]"),  # does not divide 0.025
    ("walker", {"gravity": "heavy"}, "gravity", "[0, inf)"),
])
def test_validate_context_rejects(task, values, feature, rng):
    with pytest.raises(ValueError) as e:
        C.validate_context(task, values)
    assert repr(feature) in str(e.value) and rng in str(e.value)


def test_validate_context_unknown_feature():
    with pytest.raises(ValueError, match="'string_length'.*known features"):
        C.validate_context("walker", {"string_length": 0.3})
    with pytest.raises(ValueError, match="'gravitas'"):
        C.validate_context("ball_in_cup", {"gravitas": 9.81})
    with pytest.raises(ValueError, match="unknown task"):
        C.validate_context("cheetah", {})


@pytest.mark.parametrize("task", TASKS)
def test_context_sets(task):
    f0, f1 = C.FACTORS[task]
    d = C.DEFAULTS[task]
    assert C.make_context_set(task, "default", seed=0) == {0: d}
    spec = C.make_context_set(task, "specific", seed=0, specific={f0: 2.45})
    assert spec == {0: {f0: 2.45, f1: d[f1]}}
    with pytest.raises(ValueError):
        C.make_context_set(task, "specific", seed=0)
    with pytest.raises(ValueError):
        C.make_context_set(task, "triple", seed=0)
    for setting, varied in (("single_0", (f0,)), ("single_1", (f1,)), ("double_box", (f0, f1))):
        assert C.varied_factors(task, setting) == varied
        a = C.make_context_set(task, setting, seed=3)
        assert a == C.make_context_set(task, setting, seed=3)  # reproducible
        assert a != C.make_context_set(task, setting, seed=4)
        assert sorted(a) == list(range(100))
        for f in (f0, f1):
            vals = np.array([c[f] for c in a.values()])
            if f in varied:
                lo, hi = C.train_range(task, f)
                assert vals.min() >= lo and vals.max() <= hi
                assert len(np.unique(vals)) == 100
                assert vals.min() < lo + 0.1 * (hi - lo) and vals.max() > hi - 0.1 * (hi - lo)
            else:
                assert np.all(vals == d[f])
    assert len(C.make_context_set(task, "double_box", seed=0, n=7)) == 7
    assert C.varied_factors(task, "default") == C.varied_factors(task, "specific") == ()


def test_round_robin_cycles_and_state():
    ids = list(range(20))
    rr = C.RoundRobin(ids, np.random.default_rng(0))
    cycles = [[rr.next() for _ in ids] for _ in range(3)]
    for cyc in cycles:
        assert sorted(cyc) == ids  # each id exactly once per cycle
    assert cycles[0] != cycles[1] != cycles[2]  # reshuffled
    assert cycles[0] != ids
    other = C.RoundRobin(ids, np.random.default_rng(1))
    assert [other.next() for _ in ids] != cycles[0]  # each env its own order
    # checkpointing mid-cycle reproduces the continuation
    rr.next()
    state = rr.state_dict()
    cont = [rr.next() for _ in range(45)]
    rr2 = C.RoundRobin(ids, np.random.default_rng(123))
    rr2.load_state_dict(state)
    assert [rr2.next() for _ in range(45)] == cont
    # arbitrary hashable ids
    rr3 = C.RoundRobin(["a", "b"], 0)
    assert sorted([rr3.next(), rr3.next()]) == ["a", "b"]


def _grid_values(task, kind, factor_index):
    return sorted({g.values[C.FACTORS[task][factor_index]]
                   for g in C.evaluation_grid(task) if g.kind == kind})


@pytest.mark.parametrize("task", TASKS)
def test_evaluation_grid(task):
    grid = C.evaluation_grid(task)
    f0, f1 = C.FACTORS[task]
    d0, d1 = C.DEFAULTS[task][f0], C.DEFAULTS[task][f1]
    assert len(grid) == 84
    assert [g.index for g in grid] == list(range(84))
    assert collections.Counter(g.kind for g in grid) == {"single_0": 15, "single_1": 13,
                                                         "double": 56}
    keys = [(g.values[f0], g.values[f1]) for g in grid]
    assert len(set(keys)) == 84
    assert keys.count((d0, d1)) == 1  # the default context, as a factor-0 single
    assert grid == C.evaluation_grid(task)  # fixed order
    assert _grid_values(task, "single_0", 0) == sorted(
        [4.9, 7.35, 9.81, 12.25, 14.7, 0.98, 1.715, 2.45, 3.185, 3.92,
         15.68, 16.66, 17.64, 18.62, 19.6])
    assert _grid_values(task, "single_0", 1) == [d1]
    assert _grid_values(task, "single_1", 0) == [9.81]
    assert _grid_values(task, "double", 0) == sorted([4.9, 14.7, 0.98, 2.45, 3.92, 15.68,
                                                      17.64, 19.6])
    if task == "ball_in_cup":
        singles1 = [0.15, 0.225, 0.375, 0.45, 0.03, 0.06, 0.09, 0.12, 0.48, 0.51, 0.54,
                    0.57, 0.6]
        double1 = [0.15, 0.45, 0.03, 0.09, 0.48, 0.54, 0.6]
    else:
        singles1 = [0.5, 0.75, 1.25, 1.5, 0.1, 0.2, 0.3, 0.4, 1.6, 1.7, 1.8, 1.9, 2.0]
        double1 = [0.5, 1.5, 0.1, 0.3, 1.6, 1.8, 2.0]
    assert _grid_values(task, "single_1", 1) == sorted(singles1)
    assert _grid_values(task, "double", 1) == sorted(double1)
    pairs = {(g.values[f0], g.values[f1]) for g in grid if g.kind == "double"}
    assert pairs == {(a, b) for a in _grid_values(task, "double", 0) for b in double1}


@pytest.mark.parametrize("task", TASKS)
def test_regime_counts(task):
    grid = C.evaluation_grid(task)
    expect = {"single_0": {"interpolation": 4, "extrapolation": 10},
              "single_1": {"interpolation": 4, "extrapolation": 9},
              "double_box": {"interpolation": 13, "extrapolation": 30, "mixed": 41}}
    for setting, counts in expect.items():
        got = collections.Counter(C.regime(task, setting, g.values) for g in grid)
        scored = {k: v for k, v in got.items() if k is not None}
        assert scored == counts, setting
        assert got[None] == 84 - sum(counts.values())
    # pooled over the settings: 21 interpolation, 49 extrapolation, 41 mixed
    pooled = collections.Counter(C.regime(task, s, g.values) for s in expect for g in grid)
    assert (pooled["interpolation"], pooled["extrapolation"], pooled["mixed"]) == (21, 49, 41)
    assert all(C.regime(task, s, g.values) is None for s in ("default", "specific")
               for g in grid)
    with pytest.raises(ValueError):
        C.regime(task, "sideways", {})


def test_regime_examples():
    bic = "ball_in_cup"
    assert C.regime(bic, "single_0", {"gravity": 0.98}) == "extrapolation"
    assert C.regime(bic, "single_0", {"gravity": 7.35}) == "interpolation"
    assert C.regime(bic, "single_0", {"gravity": 9.81}) is None  # default: not scored
    assert C.regime(bic, "single_0", {"gravity": 7.35, "string_length": 0.45}) is None
    assert C.regime(bic, "single_1", {"string_length": 0.6}) == "extrapolation"
    assert C.regime(bic, "single_1", {"string_length": 0.15}) == "interpolation"  # boundary
    assert C.regime(bic, "double_box", {"gravity": 9.81, "string_length": 0.3}) == \
        "interpolation"
    assert C.regime(bic, "double_box", {"gravity": 0.98}) == "mixed"
    assert C.regime(bic, "double_box", {"gravity": 4.9, "string_length": 0.54}) == "mixed"
    assert C.regime(bic, "double_box", {"gravity": 2.45, "string_length": 0.09}) == \
        "extrapolation"
    assert C.regime("walker", "double_box", {"gravity": 14.7, "actuator_strength": 0.5}) == \
        "interpolation"
    assert C.regime("walker", "single_1", {"actuator_strength": 0.1}) == "extrapolation"

"""Aggregate statistics: hand-computed values, agreement with rliable, reproducibility, speed."""

import numpy as np
import pytest

from dali_jax.analysis import stats as ST


# ----------------------------------------------------------------------------- hand-computed
def test_iqm_by_hand():
    # 10 entries -> floor(2.5) = 2 trimmed from each end.
    # sorted: -3 0 | 1 2 4 4 6 8 | 9 50  -> mean(1, 2, 4, 4, 6, 8) = 25 / 6
    x = np.array([[9, -3, 4, 4, 1], [0, 8, 2, 50, 6]], float)
    assert ST.iqm(x) == pytest.approx(25 / 6, abs=1e-12)
    # 8 entries -> 2 trimmed each end: mean(3, 4, 5, 6)
    assert ST.iqm([[1, 2, 3, 4], [5, 6, 7, 100]]) == pytest.approx(4.5, abs=1e-12)
    # fewer than 4 entries: nothing trimmed
    assert ST.iqm([[1.0, 2.0, 9.0]]) == pytest.approx(4.0)


def test_median_mean_optimality_gap_by_hand():
    x = np.array([[0, 1, 5], [2, 3, 1]], float)  # per-context means 1, 2, 3
    assert ST.median(x) == pytest.approx(2.0)
    assert ST.mean(x) == pytest.approx(2.0)
    # per-context means 1, 4 (median of two = 2.5) ; mean 2.5
    assert ST.median([[0, 8], [2, 0]]) == pytest.approx(2.5)
    # max(1 - x, 0): 0.5, 0, 0, 1.5 -> 0.5
    assert ST.optimality_gap([[0.5, 1.2], [1.0, -0.5]]) == pytest.approx(0.5)
    assert ST.optimality_gap([[0.5, 1.2]], gamma=2.0) == pytest.approx((1.5 + 0.8) / 2)


def test_probability_of_improvement_with_ties_by_hand():
    # context 0: x = 1, 2 vs y = 2, 0 -> pairs 0, 1, 0.5, 1 -> 2.5 / 4 = 0.625
    # context 1: identical runs -> 0.5
    x = np.array([[1, 3], [2, 3]], float)
    y = np.array([[2, 3], [0, 3]], float)
    assert ST.probability_of_improvement(x, y) == pytest.approx((0.625 + 0.5) / 2)
    assert ST.probability_of_improvement(y, x) == pytest.approx(1 - (0.625 + 0.5) / 2)
    # unequal numbers of runs: x = 1, 1, 3 vs y = 1, 2 -> (0.5+0+0.5+0+1+1) / 6
    assert ST.probability_of_improvement([[1], [1], [3]], [[1], [2]]) == pytest.approx(3 / 6)


def test_bootstrap_distribution_by_hand():
    # One context, runs {0, 1}: a resample's mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    _, samples = ST.stratified_bootstrap([[0.0], [1.0]], metrics=("mean",), reps=40_000, seed=1,
                                        return_samples=True)
    vals, counts = np.unique(samples["mean"], return_counts=True)
    np.testing.assert_allclose(vals, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.01)
    # P(X > Y) with x = {0, 2}, y = {1}: a resample of x gives 0, 1/2, 1 w.p. 1/4, 1/2, 1/4
    _, s = ST.bootstrap_probability_of_improvement([[0.0], [2.0]], [[1.0]], reps=40_000, seed=2,
                                                  return_samples=True)
    vals, counts = np.unique(s, return_counts=True)
    np.testing.assert_allclose(vals, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.01)


def test_degenerate_intervals():
    const = np.tile(np.array([[0.2, 0.7, 1.4]]), (4, 1))  # every column constant across runs
    for iv in ST.stratified_bootstrap(const, reps=500).values():
        assert iv.low == pytest.approx(iv.estimate) and iv.high == pytest.approx(iv.estimate)
    iv = ST.bootstrap_probability_of_improvement(const + 1, const, reps=500)
    assert iv.as_tuple() == pytest.approx((1.0, 1.0, 1.0))


def test_interval_contains_estimate_and_is_ordered():
    x = np.random.default_rng(0).normal(size=(6, 30))
    for iv in ST.stratified_bootstrap(x, reps=2000, seed=3).values():
        assert iv.low <= iv.estimate <= iv.high and iv.low < iv.high


# ----------------------------------------------------------------------------- rliable oracle
@pytest.fixture(scope="module")
def rl():
    pytest.importorskip("rliable")
    from rliable import library, metrics

    return library, metrics


def _rl_aggregates(metrics, s):
    return np.array([metrics.aggregate_iqm(s), metrics.aggregate_median(s),
                     metrics.aggregate_mean(s), metrics.aggregate_optimality_gap(s)])


@pytest.mark.parametrize("shape", [(10, 84), (5, 7), (3, 1), (1, 4)])
def test_point_estimates_match_rliable(rl, shape):
    _, metrics = rl
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(0.6, 0.5, shape)
    x[0, 0] = x[-1, -1]  # a tie
    ours = np.array([ST.iqm(x), ST.median(x), ST.mean(x), ST.optimality_gap(x)])
    np.testing.assert_allclose(ours, _rl_aggregates(metrics, x), rtol=0, atol=1e-12)
    y = np.round(rng.normal(0.5, 0.5, (shape[0] + 2, shape[1])), 1)
    xr = np.round(x, 1)  # coarse values -> many ties
    assert ST.probability_of_improvement(xr, y) == pytest.approx(
        metrics.probability_of_improvement(xr, y), abs=1e-12)
    assert ST.probability_of_improvement(xr, xr) == pytest.approx(0.5, abs=1e-12)


def test_bootstrap_cis_match_rliable(rl):
    library, metrics = rl
    rng = np.random.default_rng(7)
    x = rng.normal(0.5, 0.4, (5, 20))
    np.random.seed(0)  # rliable's StratifiedBootstrap draws from the global numpy RNG
    _, ci = library.get_interval_estimates(
        {"x": x}, lambda s: _rl_aggregates(metrics, s), reps=5000)
    ours = ST.stratified_bootstrap(x, reps=50_000, seed=0)
    names = ("iqm", "median", "mean", "optimality_gap")
    got = np.array([[ours[k].low for k in names], [ours[k].high for k in names]])
    # CI widths here are ~0.15; Monte-Carlo error of 5k-replicate percentiles is ~0.005
    np.testing.assert_allclose(got, ci["x"], atol=0.015)


def test_probability_of_improvement_ci_matches_rliable(rl):
    library, metrics = rl
    rng = np.random.default_rng(11)
    x = np.round(rng.normal(0.55, 0.3, (5, 12)), 1)
    y = np.round(rng.normal(0.45, 0.3, (6, 12)), 1)
    ours = ST.bootstrap_probability_of_improvement(x, y, reps=50_000, seed=0)
    # rliable's own statistic is slow (scipy per context per replicate): few replicates, loose tol
    np.random.seed(1)
    _, ci = library.get_interval_estimates(
        {"xy": [x[:, :3], y[:, :3]]},
        lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=300)
    small = ST.bootstrap_probability_of_improvement(x[:, :3], y[:, :3], reps=20_000, seed=0)
    np.testing.assert_allclose([small.low, small.high], ci["xy"][:, 0], atol=0.06)
    # rliable's resampling scheme (independent stratified) with the (verified equal) fast
    # statistic, at enough replicates for a tight comparison
    np.random.seed(2)
    _, ci = library.get_interval_estimates(
        {"xy": [x, y]}, lambda a, b: np.array([ST.probability_of_improvement(a, b)]), reps=5000)
    np.testing.assert_allclose([ours.low, ours.high], ci["xy"][:, 0], atol=0.012)


# ----------------------------------------------------------------------------- reproducibility
def test_reproducible_from_seed():
    x = np.random.default_rng(5).normal(size=(4, 9))
    y = np.random.default_rng(6).normal(size=(3, 9))
    a = ST.stratified_bootstrap(x, reps=3000, seed=123)
    b = ST.stratified_bootstrap(x, reps=3000, seed=123)
    c = ST.stratified_bootstrap(x, reps=3000, seed=124)
    assert a == b and a != c
    g1 = ST.stratified_bootstrap(x, reps=3000, seed=np.random.default_rng(123))
    assert g1 == a
    p = ST.bootstrap_probability_of_improvement(x, y, reps=3000, seed=9)
    assert p == ST.bootstrap_probability_of_improvement(x, y, reps=3000, seed=9)
    assert p != ST.bootstrap_probability_of_improvement(x, y, reps=3000, seed=10)


def test_chunking_does_not_change_the_distribution():
    x = np.random.default_rng(8).normal(size=(6, 30))
    big = ST.stratified_bootstrap(x, reps=10_000, seed=0)
    small = ST.stratified_bootstrap(x, reps=10_000, seed=0, max_elements=500)
    for k in big:
        assert big[k].low == pytest.approx(small[k].low, abs=0.02)
        assert big[k].high == pytest.approx(small[k].high, abs=0.02)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((0, 3)), np.zeros((2, 0)),
                                 [[1.0, np.nan]], np.zeros((2, 2, 2))])
def test_bad_matrices_raise(bad):
    with pytest.raises(ValueError):
        ST.iqm(bad)
    with pytest.raises(ValueError):
        ST.stratified_bootstrap(bad, reps=10)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="same number of contexts"):
        ST.probability_of_improvement(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown metric"):
        ST.stratified_bootstrap(np.zeros((2, 2)), metrics=("iqr",), reps=10)
    with pytest.raises(ValueError, match="reps"):
        ST.stratified_bootstrap(np.zeros((2, 2)), reps=0)
    with pytest.raises(ValueError, match="confidence"):
        ST.stratified_bootstrap(np.zeros((2, 2)), reps=10, confidence=1.5)

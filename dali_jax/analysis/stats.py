"""Aggregate statistics over (runs x contexts) score matrices, in plain numpy.

Conventions follow the rliable methodology (Agarwal et al., 2021):

* A score matrix has shape ``(R, C)``: ``R`` runs (seeds) by ``C`` contexts (tasks).
* ``iqm``: 25% trimmed mean over all ``R * C`` entries; ``floor(0.25 * R * C)`` entries are
  dropped from each end.
* ``median`` / ``mean``: median / mean over contexts of the per-context mean over runs.
* ``optimality_gap``: mean over all entries of ``max(gamma - x, 0)`` (``gamma = 1``).
* ``probability_of_improvement(x, y)``: per context, ``P(X > Y)`` over all run pairs with ties
  counted 1/2 (the Mann-Whitney U statistic divided by ``Rx * Ry``), averaged over contexts.
* Confidence intervals: stratified bootstrap, i.e. every replicate resamples the runs with
  replacement independently within each context column (for probability of improvement, ``x``
  and ``y`` are resampled independently); percentile intervals.

Every bootstrap takes ``seed`` (an int, a ``np.random.SeedSequence`` or a ``np.random.Generator``)
and is reproducible given the seed, the number of replicates and ``max_elements``. Replicates are
drawn in chunks of at most ``max_elements`` resampled entries to bound memory.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_REPS", "METRICS", "Interval",
    "iqm", "median", "mean", "optimality_gap", "probability_of_improvement",
    "percentile_interval", "stratified_bootstrap", "bootstrap_probability_of_improvement",
]

DEFAULT_REPS = 50_000
_DEFAULT_MAX_ELEMENTS = 4_000_000  # resampled entries held in memory per chunk


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.estimate, self.low, self.high)


# ----------------------------------------------------------------------------- validation
def _as_matrix(scores, name: str = "scores") -> np.ndarray:
    """Validate and return a float64 ``(R, C)`` matrix with R >= 1, C >= 1, all finite."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (runs x contexts) matrix, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must have at least one run and one context, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _chunks(reps: int, per_rep: int, max_elements: int) -> Iterable[int]:
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    size = max(1, min(reps, int(max_elements) // max(1, per_rep)))
    done = 0
    while done < reps:
        n = min(size, reps - done)
        yield n
        done += n


# ----------------------------------------------------------------------------- batched metrics
# Each takes a batch of matrices, shape (B, R, C), and returns shape (B,).
def _iqm_batch(s: np.ndarray) -> np.ndarray:
    b = s.shape[0]
    flat = s.reshape(b, -1)
    n = flat.shape[1]
    cut = int(0.25 * n)
    if cut == 0:
        return flat.mean(axis=1)
    part = np.partition(flat, (cut, n - cut - 1), axis=1)
    return part[:, cut:n - cut].mean(axis=1)


def _median_batch(s: np.ndarray) -> np.ndarray:
    return np.median(s.mean(axis=1), axis=1)


def _mean_batch(s: np.ndarray) -> np.ndarray:
    return s.mean(axis=1).mean(axis=1)


def _optimality_gap_batch(s: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    b = s.shape[0]
    return np.maximum(gamma - s.reshape(b, -1), 0.0).mean(axis=1)


METRICS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
    "iqm": _iqm_batch,
    "median": _median_batch,
    "mean": _mean_batch,
    "optimality_gap": _optimality_gap_batch,
}


# ----------------------------------------------------------------------------- point estimates
def iqm(scores) -> float:
    """Interquartile mean of all entries of ``scores`` (R, C)."""
    return float(_iqm_batch(_as_matrix(scores)[None])[0])


def median(scores) -> float:
    """Median over contexts of the per-context mean over runs; ``scores`` (R, C)."""
    return float(_median_batch(_as_matrix(scores)[None])[0])


def mean(scores) -> float:
    """Mean over contexts of the per-context mean over runs; ``scores`` (R, C)."""
    return float(_mean_batch(_as_matrix(scores)[None])[0])


def optimality_gap(scores, gamma: float = 1.0) -> float:
    """Mean over all entries of ``max(gamma - x, 0)``; ``scores`` (R, C)."""
    return float(_optimality_gap_batch(_as_matrix(scores)[None], gamma)[0])


def _pairwise_wins(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``K[i, j, c] = 1[x_ic > y_jc] + 0.5 * 1[x_ic == y_jc]``; x (Rx, C), y (Ry, C) -> (Rx, Ry, C).
    """
    xi = x[:, None, :]
    yj = y[None, :, :]
    return (xi > yj).astype(np.float64) + 0.5 * (xi == yj)


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = _as_matrix(x, "scores_x")
    y = _as_matrix(y, "scores_y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"scores_x and scores_y must have the same number of contexts, got {x.shape[1]} "
            f"and {y.shape[1]}")
    return x, y


def probability_of_improvement(scores_x, scores_y) -> float:
    """Average over contexts of P(X > Y) (ties count 1/2); x (Rx, C), y (Ry, C)."""
    x, y = _check_pair(scores_x, scores_y)
    return float(_pairwise_wins(x, y).mean(axis=(0, 1)).mean())


# ----------------------------------------------------------------------------- bootstrap
def percentile_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of 1-D bootstrap ``samples`` (linear interpolation)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _resample_counts(rng: np.random.Generator, b: int, n: int, c: int) -> np.ndarray:
    """Multiplicities of each run in ``b`` stratified resamples: shape (b, c, n), rows sum to n."""
    idx = rng.integers(0, n, size=(b, n, c))
    # flat bin = (replicate * c + context) * n + drawn run
    bins = (np.arange(b)[:, None, None] * c + np.arange(c)[None, None, :]) * n + idx
    return np.bincount(bins.ravel(), minlength=b * c * n).reshape(b, c, n).astype(np.float64)


def stratified_bootstrap(
    scores,
    metrics: Sequence[str] = ("iqm", "median", "mean", "optimality_gap"),
    reps: int = DEFAULT_REPS,
    seed=0,
    confidence: float = 0.95,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
    return_samples: bool = False,
):
    """Point estimates and stratified-bootstrap percentile CIs of aggregate metrics.

    Args:
      scores: (R, C) matrix, runs x contexts.
      metrics: names from ``METRICS``; all share the same resamples.
      reps: number of bootstrap replicates.
      seed: int / SeedSequence / Generator.
      confidence: interval coverage.
      max_elements: upper bound on resampled entries per chunk (memory bound).
      return_samples: also return ``{metric: (reps,) replicate values}``.

    Returns:
      ``{metric: Interval}`` (and the samples dict if ``return_samples``).
    """
    s = _as_matrix(scores)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    rng = _rng(seed)
    r, c = s.shape
    cols = np.arange(c)[None, None, :]
    samples = {m: np.empty(reps) for m in metrics}
    start = 0
    for b in _chunks(reps, r * c, max_elements):
        idx = rng.integers(0, r, size=(b, r, c))
        res = s[idx, cols]  # (b, R, C): column c holds runs resampled within context c
        for m in metrics:
            samples[m][start:start + b] = METRICS[m](res)
        start += b
    out = {}
    for m in metrics:
        lo, hi = percentile_interval(samples[m], confidence)
        out[m] = Interval(float(METRICS[m](s[None])[0]), lo, hi)
    return (out, samples) if return_samples else out


def bootstrap_probability_of_improvement(
    scores_x,
    scores_y,
    reps: int = DEFAULT_REPS,
    seed=0,
    confidence: float = 0.95,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
    return_samples: bool = False,
):
    """P(X > Y) with a stratified-bootstrap percentile CI; x (Rx, C), y (Ry, C).

    x and y are resampled independently within each context. A replicate's value is computed
    exactly from run multiplicities: ``sum_ij n_x[i] K[i, j] n_y[j] / (Rx * Ry)`` per context.

    Returns:
      ``Interval`` (and the (reps,) samples if ``return_samples``).
    """
    x, y = _check_pair(scores_x, scores_y)
    rng = _rng(seed)
    rx, ry, c = x.shape[0], y.shape[0], x.shape[1]
    k = np.ascontiguousarray(_pairwise_wins(x, y).transpose(2, 0, 1))  # (C, Rx, Ry)
    samples = np.empty(reps)
    start = 0
    for b in _chunks(reps, c * (rx * ry + rx + ry), max_elements):
        nx = _resample_counts(rng, b, rx, c)  # (b, C, Rx)
        ny = _resample_counts(rng, b, ry, c)  # (b, C, Ry)
        t = np.matmul(nx.transpose(1, 0, 2), k)  # (C, b, Ry)
        u = np.einsum("cbj,bcj->bc", t, ny)  # (b, C)
        samples[start:start + b] = u.mean(axis=1) / (rx * ry)
        start += b
    lo, hi = percentile_interval(samples, confidence)
    out = Interval(float(k.mean(axis=(1, 2)).mean()), lo, hi)
    return (out, samples) if return_samples else out

"""The task's two varied factors and the protocol's expert contexts (docs/protocol.md).

Expert contexts: the protocol lists 21 per task (9 gravity values at the factor-1 default, 8
factor-1 values at the default gravity, 4 corners); the default context appears in both lists, so
``expert_contexts`` returns 20 distinct contexts. ``nearest_expert`` picks the one a context is
scored against (Euclidean distance after min-max scaling each factor, ``minmax_ranges``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["factors", "defaults", "context_key", "expert_contexts", "minmax_ranges",
           "nearest_expert"]

_ROUND = 6

# Expert contexts of docs/protocol.md: factor-0 values (at the factor-1 default), factor-1
# values (at the factor-0 default), and the (low, high) factor-1 values of the four corners
# at gravity 2.45 / 17.64.
_EXPERT_GRAVITY = (0.98, 2.45, 3.92, 4.9, 9.81, 14.7, 15.68, 17.64, 19.6)
_EXPERT_FACTOR1 = {
    "ball_in_cup": (0.03, 0.09, 0.15, 0.225, 0.3, 0.45, 0.54, 0.6),
    "walker": (0.1, 0.3, 0.5, 1.0, 1.5, 1.6, 1.8, 2.0),
}
_CORNER_GRAVITY = (2.45, 17.64)
_CORNER_FACTOR1 = {"ball_in_cup": (0.09, 0.54), "walker": (0.3, 1.8)}


def _contexts_module():
    from dali_jax.envs import contexts  # lazy: the env package pulls in heavier deps

    return contexts


def factors(task: str) -> tuple[str, str]:
    """The two varied factor names of ``task``."""
    table = _contexts_module().FACTORS
    if task not in table:
        raise ValueError(f"unknown task {task!r}; known: {sorted(table)}")
    return tuple(table[task])


def defaults(task: str) -> dict[str, float]:
    """Default values of the two varied factors of ``task``."""
    d = _contexts_module().DEFAULTS[task]
    return {f: float(d[f]) for f in factors(task)}


def context_key(values: Mapping[str, float], names: Sequence[str]) -> tuple[float, ...]:
    """The values of factors `names` rounded to 6 decimals: how contexts are matched."""
    return tuple(round(float(values[f]), _ROUND) for f in names)


def expert_contexts(task: str) -> list[dict[str, float]]:
    """The 20 distinct expert contexts of ``task`` (docs/protocol.md lists the default twice)."""
    f0, f1 = factors(task)
    d = defaults(task)
    out = [{f0: g, f1: d[f1]} for g in _EXPERT_GRAVITY]
    out += [{f0: d[f0], f1: v} for v in _EXPERT_FACTOR1[task]]
    lo, hi = _CORNER_FACTOR1[task]
    g_lo, g_hi = _CORNER_GRAVITY
    out += [{f0: g_lo, f1: lo}, {f0: g_hi, f1: lo}, {f0: g_hi, f1: hi}, {f0: g_lo, f1: hi}]
    seen, unique = set(), []
    for c in out:
        k = context_key(c, (f0, f1))
        if k not in seen:
            seen.add(k)
            unique.append(c)
    return unique


def minmax_ranges(contexts: Iterable[Mapping[str, float]],
                  names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``{factor: (min, max)}`` over ``contexts``."""
    vals = [[float(c[f]) for f in names] for c in contexts]
    if not vals:
        raise ValueError("minmax_ranges needs at least one context")
    a = np.asarray(vals)
    return {f: (float(a[:, i].min()), float(a[:, i].max())) for i, f in enumerate(names)}


def nearest_expert(values: Mapping[str, float], experts: Sequence[Mapping[str, float]],
                   ranges: Mapping[str, tuple[float, float]]) -> int:
    """Index into ``experts`` of the expert context nearest to ``values``.

    Distance: Euclidean after scaling each factor ``f`` of ``ranges`` to ``(v - min) / (max - min)``
    (a factor with ``max == min`` is ignored). Ties go to the first expert.
    """
    if not experts:
        raise ValueError("nearest_expert needs at least one expert context")
    names = list(ranges)
    lo = np.array([ranges[f][0] for f in names], dtype=np.float64)
    span = np.array([ranges[f][1] - ranges[f][0] for f in names], dtype=np.float64)
    span = np.where(span > 0, span, np.inf)
    e = (np.array([[float(x[f]) for f in names] for x in experts]) - lo) / span
    v = (np.array([float(values[f]) for f in names]) - lo) / span
    return int(np.argmin(np.sqrt(((e - v) ** 2).sum(axis=1))))


"""Context factors, context sets, the evaluation grid and its regimes (see docs/protocol.md).

A *context* is a plain ``dict[str, float]`` of physical parameters. Each task varies two
factors (``FACTORS[task]``); the agent observes them normalised over the train range,
``c_norm = 2 (c - lo) / (hi - lo) - 1`` (train values lie in [-1, 1]).
Walker additionally accepts every context feature of carl-bench's ``CARLDmcWalkerEnv``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

TASKS: tuple[str, ...] = ("ball_in_cup", "walker")

FACTORS: dict[str, tuple[str, str]] = {
    "ball_in_cup": ("gravity", "string_length"),
    "walker": ("gravity", "actuator_strength"),
}

DEFAULTS: dict[str, dict[str, float]] = {
    "ball_in_cup": {"gravity": 9.81, "string_length": 0.3},
    "walker": {"gravity": 9.81, "actuator_strength": 1.0},
}

SETTINGS: tuple[str, ...] = ("default", "single_0", "single_1", "double_box", "specific")
SCORED_SETTINGS: tuple[str, ...] = ("single_0", "single_1", "double_box")
REGIMES: tuple[str, ...] = ("interpolation", "extrapolation", "mixed")

_TRAIN_RANGES: dict[str, tuple[float, float]] = {
    "gravity": (4.9, 14.7),
    "string_length": (0.15, 0.45),
    "actuator_strength": (0.5, 1.5),
}

_TOL = 1e-9  # tolerance for "inside the train range" and "equals the default"


@dataclasses.dataclass(frozen=True)
class Interval:
    """A closed or half-open interval of valid values; ``str`` gives e.g. ``(0, 0.9]``."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"
        left = "(" if self.lo_open or self.lo == -math.inf else "["
        right = ")" if self.hi_open or self.hi == math.inf else "]"
        return f"{left}{fmt(self.lo)}, {fmt(self.hi)}{right}"


_INF = math.inf
_NONNEG = Interval(0.0, _INF)
_POS = Interval(0.0, _INF, lo_open=True)
_REAL = Interval(-_INF, _INF, lo_open=True, hi_open=True)

# Walker's extra features (carl-bench CARLDmcWalkerEnv): default value and physically valid range.
# Multiplicative features scale the corresponding value of the base model (as CARL's XML edit does).
_WALKER_EXTRA: dict[str, tuple[float, Interval]] = {
    "friction_torsional": (1.0, _NONNEG),
    "friction_rolling": (1.0, _NONNEG),
    "friction_tangential": (1.0, _NONNEG),
    # The control step is 0.025 s and must be an integer multiple of the physics step.
    "timestep": (0.0025, Interval(0.001, 0.025)),
    "joint_damping": (1.0, _NONNEG),
    "joint_stiffness": (0.0, _NONNEG),
    "density": (0.0, _NONNEG),
    "viscosity": (0.0, _NONNEG),
    # Zero density gives massless bodies, which MuJoCo rejects.
    "geom_density": (1.0, _POS),
    "wind_x": (0.0, _REAL),
    "wind_y": (0.0, _REAL),
    "wind_z": (0.0, _REAL),
}

WALKER_CONTROL_TIMESTEP = 0.025

# All accepted features per task: name -> (default, valid interval).
FEATURES: dict[str, dict[str, tuple[float, Interval]]] = {
    "ball_in_cup": {
        "gravity": (9.81, _NONNEG),
        # Beyond 0.9 the shifted ball (z + 0.3 - L) would start below the floor.
        "string_length": (0.3, Interval(0.0, 0.9, lo_open=True)),
    },
    "walker": {
        "gravity": (9.81, _NONNEG),
        "actuator_strength": (1.0, _NONNEG),
        **_WALKER_EXTRA,
    },
}

# Evaluation grid values (docs/protocol.md): interpolation, extrapolation, double-grid.
_GRID_VALUES: dict[str, dict[str, tuple[float, ...]]] = {
    "gravity": {
        "interp": (4.9, 7.35, 9.81, 12.25, 14.7),
        "extrap": (0.98, 1.715, 2.45, 3.185, 3.92, 15.68, 16.66, 17.64, 18.62, 19.6),
        "double": (4.9, 9.81, 14.7, 0.98, 2.45, 3.92, 15.68, 17.64, 19.6),
    },
    "string_length": {
        "interp": (0.15, 0.225, 0.3, 0.375, 0.45),
        "extrap": (0.03, 0.06, 0.09, 0.12, 0.48, 0.51, 0.54, 0.57, 0.6),
        "double": (0.15, 0.3, 0.45, 0.03, 0.09, 0.48, 0.54, 0.6),
    },
    "actuator_strength": {
        "interp": (0.5, 0.75, 1.0, 1.25, 1.5),
        "extrap": (0.1, 0.2, 0.3, 0.4, 1.6, 1.7, 1.8, 1.9, 2.0),
        "double": (0.5, 1.0, 1.5, 0.1, 0.3, 1.6, 1.8, 2.0),
    },
}


def _check_task(task: str) -> None:
    if task not in FACTORS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def train_range(task: str, factor: str) -> tuple[float, float]:
    """(low, high) of the train range of one of ``FACTORS[task]``."""
    _check_task(task)
    if factor not in FACTORS[task]:
        raise ValueError(f"{factor!r} is not a varied factor of {task}; factors: {FACTORS[task]}")
    return _TRAIN_RANGES[factor]


def valid_range(task: str, feature: str) -> Interval:
    """Physically valid interval of a context feature."""
    _check_task(task)
    if feature not in FEATURES[task]:
        raise ValueError(f"unknown context feature {feature!r} for {task}; "
                         f"known features: {sorted(FEATURES[task])}")
    return FEATURES[task][feature][1]


def feature_defaults(task: str) -> dict[str, float]:
    """Default value of every accepted context feature of ``task``."""
    _check_task(task)
    return {k: v[0] for k, v in FEATURES[task].items()}


def validate_context(task: str, values: Mapping[str, float]) -> dict[str, float]:
    """Checks a context and fills missing varied factors with their defaults.

    Returns a new dict with the two factors (in ``FACTORS`` order) followed by any extra
    features that were given. Raises ValueError naming the feature and its valid range for an
    unknown feature, a non-numeric or non-finite value, or a value outside the valid range.
    """
    _check_task(task)
    feats = FEATURES[task]
    out = {k: float(DEFAULTS[task][k]) for k in FACTORS[task]}
    for name, raw in values.items():
        if name not in feats:
            raise ValueError(f"unknown context feature {name!r} for {task}; "
                             f"known features: {sorted(feats)}")
        rng = feats[name][1]
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"context feature {name!r} of {task} must be a number in {rng}, "
                             f"got {raw!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"context feature {name!r} of {task} must be finite and in {rng}, "
                             f"got {v}")
        if v not in rng:
            raise ValueError(f"context feature {name!r} of {task} = {v} is outside its valid "
                             f"range {rng}")
        if name == "timestep":
            ratio = WALKER_CONTROL_TIMESTEP / v
            if abs(ratio - round(ratio)) > 1e-8:
                raise ValueError(f"context feature 'timestep' of {task} = {v} must divide the "
                                 f"control step {WALKER_CONTROL_TIMESTEP} s and lie in {rng}")
        out[name] = v
    return out


def normalize_context(task: str, values: Mapping[str, float]) -> np.ndarray:
    """float32 (2,): ``2 (c - lo) / (hi - lo) - 1`` per factor over the train range.

    Missing factors take their default value; extra features are ignored.
    """
    _check_task(task)
    out = np.empty(len(FACTORS[task]), np.float32)
    for i, f in enumerate(FACTORS[task]):
        lo, hi = _TRAIN_RANGES[f]
        c = float(values.get(f, DEFAULTS[task][f]))
        out[i] = 2.0 * (c - lo) / (hi - lo) - 1.0
    return out


def denormalize_context(task: str, c_norm: Sequence[float]) -> dict[str, float]:
    """Inverse of ``normalize_context``: (2,) normalised values -> factor dict."""
    _check_task(task)
    out = {}
    for i, f in enumerate(FACTORS[task]):
        lo, hi = _TRAIN_RANGES[f]
        out[f] = float(lo + (float(c_norm[i]) + 1.0) * (hi - lo) / 2.0)
    return out


def varied_factors(task: str, setting: str) -> tuple[str, ...]:
    """The factors a training context setting varies: single_0 / single_1 one, double_box
    both, default / specific none."""
    _check_task(task)
    if setting not in SETTINGS:
        raise ValueError(f"unknown context setting {setting!r}; expected one of {SETTINGS}")
    f0, f1 = FACTORS[task]
    return {"single_0": (f0,), "single_1": (f1,), "double_box": (f0, f1)}.get(setting, ())


def make_context_set(task: str, setting: str, seed: int, n: int = 100,
                     specific: Mapping[str, float] | None = None) -> dict[int, dict[str, float]]:
    """Training context set ``{id: {factor: value}}`` (ids 0..n-1), reproducible from ``seed``.

    default: the default context only; single_0 / single_1: that factor uniform over its train
    range, the other at default; double_box: both uniform in the 2-D train box; specific: the
    one context ``specific`` (missing factors at default).
    """
    _check_task(task)
    f0, f1 = FACTORS[task]
    default = {k: float(DEFAULTS[task][k]) for k in (f0, f1)}
    if setting == "default":
        return {0: dict(default)}
    if setting == "specific":
        if specific is None:
            raise ValueError("setting 'specific' needs the `specific` context")
        return {0: validate_context(task, specific)}
    if setting not in ("single_0", "single_1", "double_box"):
        raise ValueError(f"unknown context setting {setting!r}; expected one of {SETTINGS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    varied = varied_factors(task, setting)
    draws = {f: rng.uniform(*_TRAIN_RANGES[f], size=n) for f in varied}
    out = {}
    for i in range(n):
        ctx = dict(default)
        for f in varied:
            ctx[f] = float(draws[f][i])
        out[i] = ctx
    return out


class RoundRobin:
    """Randomised cyclic order over context ids: shuffle, visit each once, reshuffle.

    ``next()`` returns the next id; ``state_dict()`` / ``load_state_dict()`` checkpoint the
    order, the position and the generator state.
    """

    def __init__(self, context_ids: Sequence, rng: np.random.Generator | int | None = None):
        self.ids = list(context_ids)
        if not self.ids:
            raise ValueError("RoundRobin needs at least one context id")
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._order: list = []
        self._pos = 0

    def next(self):
        """The next context id."""
        if self._pos >= len(self._order):
            perm = self.rng.permutation(len(self.ids))
            self._order = [self.ids[i] for i in perm]
            self._pos = 0
        cid = self._order[self._pos]
        self._pos += 1
        return cid

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Picklable state: ids, current order, position, generator state."""
        return {"ids": list(self.ids), "order": list(self._order), "pos": self._pos,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a state from ``state_dict()``."""
        self.ids = list(state["ids"])
        self._order = list(state["order"])
        self._pos = int(state["pos"])
        self.rng.bit_generator.state = state["rng"]


@dataclasses.dataclass(frozen=True)
class GridContext:
    """One evaluation-grid context; kind is "single_0", "single_1" or "double"."""

    index: int
    values: dict[str, float]
    kind: str


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _TOL * max(1.0, abs(a), abs(b))


def evaluation_grid(task: str) -> list[GridContext]:
    """The 84 evaluation contexts of docs/protocol.md, in a fixed order.

    Order: 15 factor-0 singles (ascending, factor 1 at default; includes the default context),
    13 factor-1 singles (ascending, default skipped), then the 56 double-grid pairs without a
    default value (factor 0 ascending, then factor 1 ascending).
    """
    _check_task(task)
    f0, f1 = FACTORS[task]
    d0, d1 = DEFAULTS[task][f0], DEFAULTS[task][f1]
    out: list[GridContext] = []

    def add(v0: float, v1: float, kind: str) -> None:
        out.append(GridContext(len(out), {f0: float(v0), f1: float(v1)}, kind))

    for v in sorted(_GRID_VALUES[f0]["interp"] + _GRID_VALUES[f0]["extrap"]):
        add(v, d1, "single_0")
    for v in sorted(_GRID_VALUES[f1]["interp"] + _GRID_VALUES[f1]["extrap"]):
        if not _close(v, d1):
            add(d0, v, "single_1")
    for v0 in sorted(_GRID_VALUES[f0]["double"]):
        for v1 in sorted(_GRID_VALUES[f1]["double"]):
            if not _close(v0, d0) and not _close(v1, d1):
                add(v0, v1, "double")
    return out


def in_train_range(task: str, factor: str, value: float) -> bool:
    """Whether ``value`` lies in the (closed) train range of ``factor``."""
    lo, hi = train_range(task, factor)
    return lo - _TOL <= float(value) <= hi + _TOL


def regime(task: str, setting: str, values: Mapping[str, float]) -> str | None:
    """"interpolation" / "extrapolation" / "mixed", or None if not scored for ``setting``.

    single_0 scores non-default factor-0 values with factor 1 at default (single_1 likewise);
    double_box scores everything: no factor outside the train range -> interpolation, one ->
    mixed, both -> extrapolation. The settings default and specific score nothing (None).
    """
    _check_task(task)
    if setting not in SETTINGS:
        raise ValueError(f"unknown context setting {setting!r}; expected one of {SETTINGS}")
    f0, f1 = FACTORS[task]
    v0 = float(values.get(f0, DEFAULTS[task][f0]))
    v1 = float(values.get(f1, DEFAULTS[task][f1]))
    out0 = not in_train_range(task, f0, v0)
    out1 = not in_train_range(task, f1, v1)
    if setting == "double_box":
        return ("interpolation", "mixed", "extrapolation")[int(out0) + int(out1)]
    if setting in ("single_0", "single_1"):
        own, other = (0, 1) if setting == "single_0" else (1, 0)
        vals, facs = (v0, v1), (f0, f1)
        if not _close(vals[other], DEFAULTS[task][facs[other]]):
            return None
        if _close(vals[own], DEFAULTS[task][facs[own]]):
            return None
        return "extrapolation" if (out0, out1)[own] else "interpolation"
    return None

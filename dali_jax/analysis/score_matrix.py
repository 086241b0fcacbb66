"""(seeds x contexts) normalised-score matrices per regime, pooled over settings
(docs/protocol.md), and expert references from runs trained on one context."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

import numpy as np

from dali_jax.analysis.expert_contexts import context_key, factors
from dali_jax.analysis.normalize import (Normalizer, ReferenceReturns, RunResult,
                                         RunResultError)

__all__ = ["POOLED_SETTINGS", "REGIMES", "ScoreMatrix", "regime_matrices",
           "expert_reference_from_runs"]

POOLED_SETTINGS = ("single_0", "single_1", "double_box")
REGIMES = ("interpolation", "extrapolation", "mixed")


@dataclasses.dataclass(frozen=True)
class ScoreMatrix:
    """Normalised scores of one method in one regime, pooled over settings.

    Attributes:
      regime: "interpolation" | "extrapolation" | "mixed".
      scores: (S, C) array; row i holds the i-th seed (sorted) of every setting.
      columns: C pairs ``(setting, context index)``.
      values: C context-value dicts, aligned with ``columns``.
      seeds: ``{setting: sorted seeds}`` (each of length S).
    """

    regime: str
    scores: np.ndarray
    columns: tuple
    values: tuple
    seeds: dict

    def select(self, columns: Sequence[tuple]) -> np.ndarray:
        """Scores restricted to ``columns`` (in that order): (S, len(columns))."""
        pos = {c: i for i, c in enumerate(self.columns)}
        return self.scores[:, [pos[c] for c in columns]]


def _check_same_task(runs: Sequence[RunResult]) -> str:
    if not runs:
        raise ValueError("no runs given")
    task = runs[0].task
    for r in runs[1:]:
        if r.task != task:
            raise RunResultError(
                f"{r.path}: task {r.task!r} differs from task {task!r} of {runs[0].path}; "
                f"report one task at a time")
    return task


def regime_matrices(runs: Sequence[RunResult], normalizer: Normalizer,
                    settings: Sequence[str] = POOLED_SETTINGS) -> dict[str, ScoreMatrix]:
    """(seeds x contexts) normalised-score matrices per regime for ONE method's runs.

    Runs of settings outside ``settings`` are ignored. Every setting present must have the same
    number of runs (distinct seeds); each run must hold every context its setting scores. Columns
    are ``(setting, index)`` pairs in settings order then grid order; regimes without columns are
    omitted.
    """
    from dali_jax.envs import contexts as C

    task = _check_same_task(runs)
    if normalizer.task != task:
        raise ValueError(f"normaliser is for task {normalizer.task!r}, runs are for {task!r}")
    by_setting: dict[str, list[RunResult]] = defaultdict(list)
    for r in runs:
        if r.setting in settings:
            by_setting[r.setting].append(r)
    if not by_setting:
        raise ValueError(f"no runs of settings {list(settings)} among {len(runs)} run(s)")
    for s, rs in by_setting.items():
        rs.sort(key=lambda r: r.seed)
        for a, b in zip(rs, rs[1:]):
            if a.seed == b.seed:
                raise RunResultError(f"{b.path}: seed {b.seed} of setting {s!r} also in {a.path}")
    counts = {s: len(rs) for s, rs in by_setting.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"settings have different numbers of seeds {counts} (method "
                         f"{runs[0].method!r}); pooling needs equal counts")
    grid = C.evaluation_grid(task)
    cols: dict[str, list] = {g: [] for g in REGIMES}
    vals: dict[str, list] = {g: [] for g in REGIMES}
    data: dict[str, list] = {g: [] for g in REGIMES}
    for s in settings:
        if s not in by_setting:
            continue
        scored = [(g, C.regime(task, s, g.values)) for g in grid]
        scored = [(g, reg) for g, reg in scored if reg is not None]
        per_run = []
        for r in by_setting[s]:
            have = {c.index: c for c in r.contexts}
            missing = [g.index for g, _ in scored if g.index not in have]
            if missing:
                raise RunResultError(f"{r.path}: missing {len(missing)} context(s) scored for "
                                     f"setting {s!r}: indices {missing[:10]}")
            per_run.append(have)
        for g, reg in scored:
            cols[reg].append((s, g.index))
            vals[reg].append(dict(g.values))
            col = []
            for r, have in zip(by_setting[s], per_run):
                c = have[g.index]
                if (context_key(c.values, normalizer.names)
                        != context_key(g.values, normalizer.names)):
                    raise RunResultError(
                        f"{r.path}: context {g.index} has values {c.values}, the evaluation "
                        f"grid has {g.values}")
                col.append(normalizer.score(c.mean_return, c.values))
            data[reg].append(col)
    seeds = {s: tuple(r.seed for r in rs) for s, rs in by_setting.items()}
    out = {}
    for reg in REGIMES:
        if cols[reg]:
            out[reg] = ScoreMatrix(regime=reg, scores=np.asarray(data[reg], dtype=np.float64).T,
                                   columns=tuple(cols[reg]), values=tuple(vals[reg]),
                                   seeds=dict(seeds))
    return out


def expert_reference_from_runs(runs: Sequence[RunResult]) -> ReferenceReturns:
    """Expert reference from runs trained on one context (``train_context`` set).

    The expert return at a context is the max over runs (seeds) of the run's mean episode return
    at its own training context.
    """
    task = _check_same_task(runs)
    names = factors(task)
    per: dict[tuple, list] = defaultdict(list)
    ctx: dict[tuple, dict] = {}
    for r in runs:
        if r.train_context is None:
            raise RunResultError(f"{r.path}: no 'train_context'; not an expert run")
        c = r.context_by_values(r.train_context)
        if c is None:
            raise RunResultError(f"{r.path}: no evaluation at its train context {r.train_context}")
        k = context_key(r.train_context, names)
        per[k].append(c.mean_return)
        ctx[k] = r.train_context
    return ReferenceReturns.from_seed_returns(task, "expert", names,
                                              ((ctx[k], per[k]) for k in per))

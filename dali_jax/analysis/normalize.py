"""Score normalisation (docs/protocol.md): reference returns, the normaliser, run results.

Normalised score at context ``c``::

    score = (R - R_random(c)) / (R_expert(e) - R_random(c))

where ``e`` is the expert context nearest to ``c`` (Euclidean distance after min-max scaling each
factor over the evaluated contexts, by default the task's 84-context evaluation grid). Ball-in-Cup's
expert return is fixed at 1000 unless an expert file is given.

The expert contexts and the nearest-expert rule: ``dali_jax.analysis.expert_contexts``; the
(seeds x contexts) score matrices per regime: ``dali_jax.analysis.score_matrix``.

Reference-return cache (JSON, one file per task and kind)::

    {"format": "dali_jax/reference-returns", "version": 1,
     "kind": "random" | "expert", "task": "walker",
     "factors": ["gravity", "actuator_strength"],
     "entries": [{"values": {"gravity": 9.81, "actuator_strength": 1.0},
                  "return": 33.0,              # the reference return used (max over seeds)
                  "seed_returns": [31.0, 33.0]  # optional: per-seed mean returns
                 }, ...]}

``random`` files hold one entry per evaluated context; ``expert`` files one entry per expert
context. Context values are matched after rounding to 6 decimals.

Per-run evaluation results (``RUN_DIR/eval/returns.json``) are described in
``dali_jax.analysis.report``; ``load_run_result`` reads them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from dali_jax.analysis.expert_contexts import (context_key, expert_contexts, factors,
                                               minmax_ranges, nearest_expert)

__all__ = [
    "BALL_IN_CUP_EXPERT_RETURN", "OBS_KINDS", "RunResultError", "ReferenceFileError",
    "normalized_score", "ReferenceReturns", "load_reference", "save_reference",
    "Normalizer", "ContextResult", "RunResult", "load_run_result", "run_result_path",
]

BALL_IN_CUP_EXPERT_RETURN = 1000.0
OBS_KINDS = ("features", "pixels")
RESULTS_RELPATH = os.path.join("eval", "returns.json")
REFERENCE_FORMAT = "dali_jax/reference-returns"


class RunResultError(ValueError):
    """A per-run results file is missing or malformed."""


class ReferenceFileError(ValueError):
    """A random/expert reference-return file is missing or malformed."""


def normalized_score(R, R_random, R_expert):
    """``(R - R_random) / (R_expert - R_random)``; arrays broadcast. Requires expert > random."""
    R, R_random, R_expert = (np.asarray(a, dtype=np.float64) for a in (R, R_random, R_expert))
    denom = R_expert - R_random
    if np.any(~np.isfinite(denom)) or np.any(denom <= 0):
        raise ValueError(
            f"expert return must exceed random return (expert={R_expert.tolist()}, "
            f"random={R_random.tolist()})")
    out = (R - R_random) / denom
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- reference cache
@dataclasses.dataclass
class ReferenceReturns:
    """Reference returns (random policy or expert) per context of one task.

    Attributes:
      task, kind ("random" | "expert"), factors (factor names).
      entries: list of ``{"values": {factor: float}, "return": float, ["seed_returns": [...]]}``.
      source: file it was read from (for error messages), or None.
    """

    task: str
    kind: str
    factors: tuple[str, ...]
    entries: list
    source: str | None = None

    def __post_init__(self):
        self.factors = tuple(self.factors)
        self._table = {}
        for e in self.entries:
            k = context_key(e["values"], self.factors)
            if k in self._table:
                raise ReferenceFileError(
                    f"{self._where()}: duplicate {self.kind} entry for context "
                    f"{dict(zip(self.factors, k))}")
            self._table[k] = float(e["return"])

    def _where(self) -> str:
        return self.source or f"{self.kind} reference returns for {self.task}"

    @classmethod
    def from_seed_returns(cls, task: str, kind: str, names: Sequence[str],
                          items: Iterable[tuple[Mapping[str, float], Sequence[float]]]):
        """Build from ``(values, per-seed mean returns)`` pairs; the reference is the max."""
        entries = []
        for values, seed_returns in items:
            sr = [float(x) for x in seed_returns]
            if not sr:
                raise ValueError(f"no seed returns for context {dict(values)}")
            entries.append({"values": {f: float(values[f]) for f in names},
                            "return": max(sr), "seed_returns": sr})
        return cls(task=task, kind=kind, factors=tuple(names), entries=entries)

    def lookup(self, values: Mapping[str, float]) -> float:
        """Reference return at context ``values``; KeyError naming the file if absent."""
        k = context_key(values, self.factors)
        if k not in self._table:
            raise KeyError(
                f"{self._where()}: no {self.kind} return for context "
                f"{dict(zip(self.factors, k))}")
        return self._table[k]

    def __contains__(self, values) -> bool:
        return context_key(values, self.factors) in self._table

    def to_json(self) -> dict:
        return {"format": REFERENCE_FORMAT, "version": 1, "kind": self.kind, "task": self.task,
                "factors": list(self.factors), "entries": self.entries}


def save_reference(path, ref: ReferenceReturns) -> None:
    """Write ``ref`` as JSON to ``path`` (parent directories are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(ref.to_json(), indent=1))
    os.replace(tmp, p)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_reference(path, kind: str | None = None, task: str | None = None) -> ReferenceReturns:
    """Read a reference-return file; checks ``kind``/``task`` when given. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceFileError(f"{p}: reference-return file not found")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReferenceFileError(f"{p}: not valid JSON ({e})") from None

    def bad(msg):
        return ReferenceFileError(f"{p}: {msg}")

    if not isinstance(d, dict):
        raise bad("top level must be a JSON object")
    if d.get("format") != REFERENCE_FORMAT:
        raise bad(f"'format' must be {REFERENCE_FORMAT!r}, got {d.get('format')!r}")
    if d.get("kind") not in ("random", "expert"):
        raise bad(f"'kind' must be 'random' or 'expert', got {d.get('kind')!r}")
    if not isinstance(d.get("task"), str):
        raise bad("'task' must be a string")
    names = d.get("factors")
    if not (isinstance(names, list) and names and all(isinstance(f, str) for f in names)):
        raise bad("'factors' must be a non-empty list of factor names")
    entries = d.get("entries")
    if not isinstance(entries, list) or not entries:
        raise bad("'entries' must be a non-empty list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("values"), dict):
            raise bad(f"entries[{i}] must be an object with a 'values' object")
        if any(not _is_number(e["values"].get(f)) for f in names):
            raise bad(f"entries[{i}].values must give a finite number for each of {names}")
        if not _is_number(e.get("return")):
            raise bad(f"entries[{i}].return must be a finite number")
        sr = e.get("seed_returns")
        if sr is not None and not (isinstance(sr, list) and all(_is_number(x) for x in sr)):
            raise bad(f"entries[{i}].seed_returns must be a list of finite numbers")
    if kind is not None and d["kind"] != kind:
        raise bad(f"expected a {kind!r} reference file, got kind {d['kind']!r}")
    if task is not None and d["task"] != task:
        raise bad(f"reference file is for task {d['task']!r}, runs are for task {task!r}")
    return ReferenceReturns(task=d["task"], kind=d["kind"], factors=tuple(names),
                            entries=entries, source=str(p))


# ----------------------------------------------------------------------------- normaliser
class Normalizer:
    """Maps a mean return at a context to the normalised score of docs/protocol.md.

    Args:
      task: "ball_in_cup" | "walker".
      random: random-policy reference returns per evaluated context, or None.
      expert: expert reference returns per expert context, or None (allowed for ball_in_cup only:
        expert fixed at 1000).
      assume_random_zero: with ``random=None``, use R_random = 0 instead of failing.
      eval_contexts: contexts the min-max scaling runs over (default: the evaluation grid).
    """

    def __init__(self, task: str, random: ReferenceReturns | None = None,
                 expert: ReferenceReturns | None = None, *, assume_random_zero: bool = False,
                 eval_contexts: Sequence[Mapping[str, float]] | None = None):
        self.task = task
        self.names = factors(task)
        for ref, kind in ((random, "random"), (expert, "expert")):
            if ref is None:
                continue
            if ref.kind != kind:
                raise ReferenceFileError(
                    f"{ref._where()}: expected kind {kind!r}, got {ref.kind!r}")
            if ref.task != task:
                raise ReferenceFileError(
                    f"{ref._where()}: reference file is for task {ref.task!r}, runs are for "
                    f"task {task!r}")
        if random is None and not assume_random_zero:
            raise ValueError(
                f"no random-policy returns for task {task!r}: pass a random reference file "
                f"(--random FILE) or explicitly assume R_random = 0 (--assume-random-zero)")
        if expert is None and task != "ball_in_cup":
            raise ValueError(
                f"no expert returns for task {task!r}: pass an expert reference file "
                f"(--expert FILE); only ball_in_cup has a fixed expert return")
        self.random, self.expert = random, expert
        if eval_contexts is None:
            from dali_jax.envs import contexts as C

            eval_contexts = [g.values for g in C.evaluation_grid(task)]
        self.ranges = minmax_ranges(eval_contexts, self.names)
        self.experts = expert_contexts(task)

    def describe(self) -> str:
        """One line per reference source, for reports."""
        r = (f"random-policy returns from {Path(self.random.source).name}"
             if self.random is not None and self.random.source else
             "random-policy returns given in memory" if self.random is not None else
             "R_random = 0 ASSUMED (no random-policy file)")
        e = (f"expert returns from {Path(self.expert.source).name} (nearest expert context)"
             if self.expert is not None and self.expert.source else
             "expert returns given in memory (nearest expert context)"
             if self.expert is not None else
             f"expert return fixed at {BALL_IN_CUP_EXPERT_RETURN:g}")
        return f"{r}; {e}"

    def random_return(self, values: Mapping[str, float]) -> float:
        return 0.0 if self.random is None else self.random.lookup(values)

    def expert_context(self, values: Mapping[str, float]) -> dict[str, float]:
        return self.experts[nearest_expert(values, self.experts, self.ranges)]

    def expert_return(self, values: Mapping[str, float]) -> float:
        if self.expert is None:
            return BALL_IN_CUP_EXPERT_RETURN
        return self.expert.lookup(self.expert_context(values))

    def score(self, mean_return: float, values: Mapping[str, float]) -> float:
        rr, re = self.random_return(values), self.expert_return(values)
        try:
            return normalized_score(mean_return, rr, re)
        except ValueError:
            raise ValueError(
                f"cannot normalise at context {dict(values)}: expert return {re} (at "
                f"{self.expert_context(values)}) does not exceed random return {rr}") from None


# ----------------------------------------------------------------------------- run results
@dataclasses.dataclass(frozen=True)
class ContextResult:
    """Episode returns of one run at one grid context; ``returns`` shape (episodes,)."""

    index: int
    values: dict
    returns: np.ndarray

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run's evaluation (``RUN_DIR/eval/returns.json``)."""

    path: str
    task: str
    method: str
    setting: str
    seed: int
    obs: str
    contexts: tuple
    train_context: dict | None = None

    def context_by_values(self, values: Mapping[str, float]) -> ContextResult | None:
        names = tuple(values)
        k = context_key(values, names)
        for c in self.contexts:
            if context_key(c.values, names) == k:
                return c
        return None


def run_result_path(run: str | os.PathLike) -> Path:
    """``run`` itself if it is a file, else ``run/eval/returns.json``."""
    p = Path(run)
    return p if p.is_file() else p / RESULTS_RELPATH


def load_run_result(run: str | os.PathLike) -> RunResult:
    """Read and validate a run's results (a run dir or its returns.json). Errors name the file."""
    p = run_result_path(run)
    if not p.is_file():
        raise RunResultError(f"{p}: evaluation results not found (expected {RESULTS_RELPATH} "
                             f"in the run directory; run the evaluator first)")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunResultError(f"{p}: not valid JSON ({e})") from None

    def bad(msg):
        return RunResultError(f"{p}: {msg}")

    if not isinstance(d, dict):
        raise bad("top level must be a JSON object")
    for k in ("task", "method", "setting"):
        if not isinstance(d.get(k), str) or not d[k]:
            raise bad(f"{k!r} must be a non-empty string")
    if not isinstance(d.get("seed"), int) or isinstance(d.get("seed"), bool):
        raise bad("'seed' must be an integer")
    if d.get("obs") not in OBS_KINDS:
        raise bad(f"'obs' must be one of {OBS_KINDS}, got {d.get('obs')!r}")
    try:
        names = factors(d["task"])
    except ValueError as e:
        raise bad(str(e)) from None
    tc = d.get("train_context")
    if tc is not None and not (isinstance(tc, dict) and all(_is_number(tc.get(f)) for f in names)):
        raise bad(f"'train_context' must give a finite number for each of {list(names)}")
    ctxs = d.get("contexts")
    if not isinstance(ctxs, list) or not ctxs:
        raise bad("'contexts' must be a non-empty list")
    out, seen = [], set()
    for i, c in enumerate(ctxs):
        if not isinstance(c, dict):
            raise bad(f"contexts[{i}] must be an object")
        idx = c.get("index")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise bad(f"contexts[{i}].index must be an integer")
        if idx in seen:
            raise bad(f"duplicate context index {idx}")
        seen.add(idx)
        v = c.get("values")
        if not isinstance(v, dict) or any(not _is_number(v.get(f)) for f in names):
            raise bad(f"contexts[{i}].values must give a finite number for each of {list(names)}")
        r = c.get("returns")
        if not isinstance(r, list) or not r or not all(_is_number(x) for x in r):
            raise bad(f"contexts[{i}].returns must be a non-empty list of finite numbers")
        out.append(ContextResult(index=idx, values={f: float(v[f]) for f in names},
                                 returns=np.asarray(r, dtype=np.float64)))
    return RunResult(path=str(p), task=d["task"], method=d["method"], setting=d["setting"],
                     seed=d["seed"], obs=d["obs"], contexts=tuple(out),
                     train_context=None if tc is None else {f: float(tc[f]) for f in names})


# ----------------------------------------------------------------------------- matrices

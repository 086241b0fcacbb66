"""Aggregate report over evaluated runs: ``python -m dali_jax.report RUN_DIR... --out DIR``.

Per-run evaluation results (written by ``dali_jax.evaluate``), ``RUN_DIR/eval/returns.json``::

    {"task": "walker",                  # "ball_in_cup" | "walker"
     "method": "dali",                  # label runs are grouped by
     "setting": "double_box",           # default/single_0/single_1/double_box/specific
     "seed": 0,
     "obs": "features",                 # "features" | "pixels"
     "train_context": {...},            # optional; the training context of "specific" (expert) runs
     "contexts": [{"index": 0,          # index in dali_jax.envs.contexts.evaluation_grid(task)
                   "values": {"gravity": 9.81, "actuator_strength": 1.0},
                   "returns": [912.3, 930.1, ...]},   # one return per evaluation episode
                  ...]}

The report loads the runs (all of one task), groups them by method (``method (obs)`` when
observation kinds are mixed), normalises each run's mean return per context (random-policy and
expert references, see ``dali_jax.analysis.normalize``), builds per method and regime the
(seeds x contexts) matrix pooled over single_0, single_1 and double_box, and computes IQM, median,
mean and optimality gap with stratified-bootstrap CIs, plus the probability of improvement between
every pair of methods. It writes into ``--out``:

* ``summary.md``: tables per regime, reference sources, notes;
* ``summary.csv``: long format, columns ``regime, metric, method, other_method, estimate,
  ci_low, ci_high, n_seeds, n_contexts`` (``other_method`` only for ``prob_improvement``,
  meaning P(method > other_method), whose ``n_seeds`` reads ``Rx/Ry``);
* ``iqm_bars.png`` (IQM per regime with CIs) and ``heatmap_<method>_<setting>.png`` (mean raw
  return over seeds per context on the 2-D grid).

Bootstrap seeds are derived from ``--seed`` and the (regime, method[, method]) names, so results do
not change when other methods are added.

A run whose ``returns.json`` is missing, truncated or invalid is an error naming every such file;
with ``--skip-damaged`` those runs are left out, named on stderr and in summary.md's notes, and the
others are reported.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_jax.analysis import stats
from dali_jax.analysis.expert_contexts import defaults, factors
from dali_jax.analysis.normalize import (Normalizer, ReferenceFileError, RunResult,
                                         RunResultError, load_reference, load_run_result)
from dali_jax.analysis.score_matrix import POOLED_SETTINGS, REGIMES, regime_matrices

__all__ = ["ReportError", "Report", "load_runs", "load_readable_runs", "group_by_method",
           "build_report", "write_report", "main"]

METRIC_NAMES = {"iqm": "IQM", "median": "Median", "mean": "Mean",
                "optimality_gap": "Optimality gap"}


class ReportError(ValueError):
    """Bad input to the report (message names the offending file where there is one)."""


@dataclasses.dataclass
class Report:
    """Everything the report writes.

    Attributes:
      task: the runs' task.
      runs: ``{method: [RunResult]}``.
      matrices: ``{method: {regime: ScoreMatrix}}``.
      aggregates: ``{regime: {method: {metric: Interval}}}``.
      poi: ``{regime: {(x, y): (Interval, n_contexts)}}``: P(x > y) on the shared columns.
      normalisation: description of the reference returns.
      reps, seed, confidence: bootstrap settings.
      notes: free-text remarks (skipped runs, incomparable pairs, ...).
    """

    task: str
    runs: dict
    matrices: dict
    aggregates: dict
    poi: dict
    normalisation: str
    reps: int
    seed: int
    confidence: float
    notes: list


def load_readable_runs(run_dirs: Sequence[str]) -> tuple[list[RunResult], list[str]]:
    """(the runs whose results load, one message per run that does not, naming its file:
    missing, truncated or invalid ``returns.json``)."""
    runs, damaged = [], []
    for d in run_dirs:
        try:
            runs.append(load_run_result(d))
        except RunResultError as e:
            damaged.append(str(e))
    return runs, damaged


def load_runs(run_dirs: Sequence[str]) -> list[RunResult]:
    """Load every run; all must share one task. Errors name the offending file (every
    damaged one)."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs, damaged = load_readable_runs(run_dirs)
    if len(damaged) == 1:
        raise RunResultError(damaged[0])
    if damaged:
        raise RunResultError(f"{len(damaged)} runs have unreadable results: "
                             + "; ".join(damaged))
    return _check_runs(runs)


def _check_runs(runs: Sequence[RunResult]) -> list[RunResult]:
    """`runs` if they share one task and none is given twice."""
    seen = {}
    for r in runs:
        if r.task != runs[0].task:
            raise ReportError(f"{r.path}: task {r.task!r} differs from task {runs[0].task!r} of "
                              f"{runs[0].path}; report one task at a time")
        if r.path in seen:
            raise ReportError(f"{r.path}: given twice")
        seen[r.path] = r
    return list(runs)


def group_by_method(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """``{label: runs}``; label is the method, or ``method (obs)`` when obs kinds are mixed."""
    mixed = len({r.obs for r in runs}) > 1
    out: dict[str, list[RunResult]] = defaultdict(list)
    for r in runs:
        out[f"{r.method} ({r.obs})" if mixed else r.method].append(r)
    return dict(sorted(out.items()))


def _seed_for(seed: int, *names: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed)] + [zlib.crc32(n.encode()) for n in names])


def build_report(runs: Sequence[RunResult], normalizer: Normalizer, reps: int = stats.DEFAULT_REPS,
                 seed: int = 0, confidence: float = 0.95) -> Report:
    """Normalise, build regime matrices per method, bootstrap aggregates and P(improvement)."""
    if not runs:
        raise ReportError("no runs given")
    task = runs[0].task
    groups = group_by_method(runs)
    present = {r.setting for r in runs if r.setting in POOLED_SETTINGS}
    notes = []
    matrices, aggregates, poi = {}, {g: {} for g in REGIMES}, {g: {} for g in REGIMES}
    for m, rs in groups.items():
        pooled = [r for r in rs if r.setting in POOLED_SETTINGS]
        other = sorted({r.setting for r in rs} - set(POOLED_SETTINGS))
        if other:
            notes.append(f"{m}: runs of setting(s) {other} are not aggregated (heatmaps only).")
        if not pooled:
            continue
        missing = [s for s in POOLED_SETTINGS
                   if s in present and s not in {r.setting for r in pooled}]
        if missing:
            notes.append(f"{m}: no runs for setting(s) {missing}; its matrices pool the others.")
        try:
            matrices[m] = regime_matrices(pooled, normalizer)
        except (RunResultError, ReferenceFileError):
            raise
        except (KeyError, ValueError) as e:
            raise ReportError(f"method {m!r}: {e.args[0] if e.args else e}") from None
        for g, mat in matrices[m].items():
            aggregates[g][m] = stats.stratified_bootstrap(
                mat.scores, reps=reps, seed=_seed_for(seed, g, m), confidence=confidence)
    names = list(matrices)
    for g in REGIMES:
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                if g not in matrices[x] or g not in matrices[y]:
                    continue
                mx, my = matrices[x][g], matrices[y][g]
                shared = [c for c in mx.columns if c in set(my.columns)]
                if not shared:
                    notes.append(f"{g}: {x} and {y} share no contexts; no P(improvement).")
                    continue
                if len(shared) < max(len(mx.columns), len(my.columns)):
                    notes.append(f"{g}: P({x} > {y}) uses the {len(shared)} shared contexts.")
                iv = stats.bootstrap_probability_of_improvement(
                    mx.select(shared), my.select(shared), reps=reps, seed=_seed_for(seed, g, x, y),
                    confidence=confidence)
                poi[g][(x, y)] = (iv, len(shared))
    if not matrices:
        raise ReportError(f"no runs of settings {list(POOLED_SETTINGS)} to aggregate")
    return Report(task=task, runs=groups, matrices=matrices,
                  aggregates={g: a for g, a in aggregates.items() if a},
                  poi={g: p for g, p in poi.items() if p}, normalisation=normalizer.describe(),
                  reps=reps, seed=seed, confidence=confidence, notes=notes)


def _settings(rep) -> list[str]:
    have = {r.setting for rs in rep.runs.values() for r in rs}
    return [s for s in POOLED_SETTINGS if s in have]


def _fmt(iv) -> str:
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _markdown(rep: Report, plots: Sequence[Path]) -> str:
    pct = f"{100 * rep.confidence:g}%"
    lines = [f"# Zero-shot generalisation: {rep.task}", "",
             f"Normalised score = (R - R_random) / (R_expert - R_random); {rep.normalisation}.",
             f"Aggregates over (seeds x contexts) matrices pooled over the runs' settings "
             f"({', '.join(_settings(rep))}); {pct} stratified-bootstrap percentile CIs, "
             f"{rep.reps} replicates, seed {rep.seed}.", "", "## Runs", "",
             "| method | obs | setting | seeds |", "|---|---|---|---|"]
    for m, rs in rep.runs.items():
        by = defaultdict(list)
        for r in rs:
            by[(r.obs, r.setting)].append(r.seed)
        for (obs, s), seeds in sorted(by.items()):
            lines.append(f"| {m} | {obs} | {s} | {', '.join(map(str, sorted(seeds)))} |")
    for g in REGIMES:
        if g not in rep.aggregates:
            continue
        lines += ["", f"## {g.capitalize()}", "",
                  "| method | seeds | contexts | " + " | ".join(
                      f"{METRIC_NAMES[k]} [{pct} CI]" for k in METRIC_NAMES) + " |",
                  "|---|---|---|" + "---|" * len(METRIC_NAMES)]
        for m, res in rep.aggregates[g].items():
            s, c = rep.matrices[m][g].scores.shape
            lines.append(f"| {m} | {s} | {c} | " + " | ".join(_fmt(res[k]) for k in METRIC_NAMES)
                         + " |")
        if g in rep.poi:
            lines += ["", f"Probability of improvement ({g}):", "",
                      f"| X | Y | P(X > Y) [{pct} CI] | contexts |", "|---|---|---|---|"]
            for (x, y), (iv, n) in rep.poi[g].items():
                lines.append(f"| {x} | {y} | {_fmt(iv)} | {n} |")
    if rep.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _csv_rows(rep: Report):
    yield ["regime", "metric", "method", "other_method", "estimate", "ci_low", "ci_high",
           "n_seeds", "n_contexts"]
    for g, per in rep.aggregates.items():
        for m, res in per.items():
            s, c = rep.matrices[m][g].scores.shape
            for k, iv in res.items():
                yield [g, k, m, "", f"{iv.estimate:.6g}", f"{iv.low:.6g}", f"{iv.high:.6g}", s, c]
    for g, per in rep.poi.items():
        for (x, y), (iv, n) in per.items():
            s = f"{rep.matrices[x][g].scores.shape[0]}/{rep.matrices[y][g].scores.shape[0]}"
            yield [g, "prob_improvement", x, y, f"{iv.estimate:.6g}", f"{iv.low:.6g}",
                   f"{iv.high:.6g}", s, n]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def _heatmaps(rep: Report, out: Path) -> list[Path]:
    from dali_jax.analysis import plots

    from dali_jax.envs.contexts import train_range

    names, default = factors(rep.task), defaults(rep.task)
    box = {f: train_range(rep.task, f) for f in names}
    paths = []
    for m, rs in rep.runs.items():
        by_setting = defaultdict(list)
        for r in rs:
            by_setting[r.setting].append(r)
        for s, group in sorted(by_setting.items()):
            common = set.intersection(*({c.index for c in r.contexts} for r in group))
            ref = {c.index: c.values for c in group[0].contexts if c.index in common}
            idx = sorted(ref)
            means = [np.mean([{c.index: c.mean_return for c in r.contexts}[i] for r in group])
                     for i in idx]
            paths.append(plots.plot_return_heatmap(
                [ref[i] for i in idx], means, names, default,
                out / f"heatmap_{_safe(m)}_{_safe(s)}.png",
                title=f"{rep.task} / {m} / trained on {s} ({len(group)} seed(s))",
                train_box=box))
    return paths


def write_report(rep: Report, out_dir, make_plots: bool = True) -> list[Path]:
    """Write summary.md, summary.csv and plots into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_paths = []
    if make_plots:
        from dali_jax.analysis import plots

        iqm = {g: {m: res["iqm"] for m, res in per.items()} for g, per in rep.aggregates.items()}
        plot_paths.append(plots.plot_metric_bars(
            iqm, out / "iqm_bars.png", title=f"{rep.task}: IQM normalised score "
                                             f"({100 * rep.confidence:g}% CI)"))
        plot_paths += _heatmaps(rep, out)
    md = out / "summary.md"
    md.write_text(_markdown(rep, plot_paths))
    cs = out / "summary.csv"
    with cs.open("w", newline="") as f:
        csv.writer(f).writerows(_csv_rows(rep))
    return [md, cs] + plot_paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dali_jax.report",
        description="Aggregate zero-shot evaluation results of several runs (one task) into "
                    "IQM/median/mean/optimality-gap tables with bootstrap CIs and plots.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run directories holding eval/returns.json (or the JSON files)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--reps", type=int, default=stats.DEFAULT_REPS,
                   help="bootstrap replicates (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--confidence", type=float, default=0.95, help="CI coverage (default 0.95)")
    p.add_argument("--random", metavar="FILE", help="random-policy reference returns (JSON)")
    p.add_argument("--expert", metavar="FILE",
                   help="expert reference returns (JSON); ball_in_cup defaults to 1000")
    p.add_argument("--assume-random-zero", action="store_true",
                   help="without --random, normalise with R_random = 0 (stated in the report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--skip-damaged", action="store_true",
                   help="leave out runs whose results are missing, truncated or invalid "
                        "(named on stderr and in summary.md) instead of failing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.reps < 1:
            raise ReportError(f"--reps must be >= 1, got {args.reps}")
        if not 0 < args.confidence < 1:
            raise ReportError(f"--confidence must lie in (0, 1), got {args.confidence}")
        damaged = []
        if args.skip_damaged and args.runs:
            runs, damaged = load_readable_runs(args.runs)
            for msg in damaged:
                print(f"warning: skipped damaged run: {msg}", file=sys.stderr)
            if not runs:
                raise ReportError(f"none of the {len(args.runs)} runs has readable results")
            runs = _check_runs(runs)
        else:
            try:
                runs = load_runs(args.runs)
            except RunResultError as e:
                raise RunResultError(f"{e.args[0]} (--skip-damaged reports the other runs)"
                                     ) from None
        task = runs[0].task
        if args.random is None and not args.assume_random_zero:
            raise ReportError(
                "random-policy returns missing: pass --random FILE (reference returns of a "
                "uniform-random policy per context), or --assume-random-zero to normalise with "
                "R_random = 0")
        random = None if args.random is None else load_reference(args.random, "random", task)
        expert = None if args.expert is None else load_reference(args.expert, "expert", task)
        if expert is None and task != "ball_in_cup":
            raise ReportError(f"task {task!r} needs expert returns: pass --expert FILE")
        norm = Normalizer(task, random, expert, assume_random_zero=args.assume_random_zero)
        rep = build_report(runs, norm, reps=args.reps, seed=args.seed,
                           confidence=args.confidence)
        rep.notes += [f"Skipped (damaged results): {msg}" for msg in damaged]
        paths = write_report(rep, args.out, make_plots=not args.no_plots)
    except (ValueError, KeyError) as e:  # includes ReportError, RunResultError, ReferenceFileError
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    for g, per in rep.aggregates.items():
        for m, res in per.items():
            print(f"{g:13s} {m:24s} IQM {_fmt(res['iqm'])}")
    print(f"wrote {', '.join(str(p) for p in paths[:2])} and {len(paths) - 2} plot(s)")
    return 0

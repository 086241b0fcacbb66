"""Learning curves of training runs from their ``metrics.jsonl``.

    python -m dali_jax.curves RUN [RUN ...] [--bin 10000] [--out DIR]

Per run: the periodic evaluation returns (``eval/return_mean`` against env steps), the
training-episode returns averaged in bins of ``--bin`` env steps, the last evaluation and
the wall-clock time between the first and the last record. Prints one table per run and,
with ``--out``, writes ``curves.csv`` and ``curves.png`` there.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

EVAL_KEY = "eval/return_mean"
EPISODE_KEY = "episode/return"


@dataclasses.dataclass
class Curve:
    name: str
    eval_steps: list[int]
    eval_returns: list[float]
    bins: list[tuple[int, float, int]]  # (first env step of the bin, mean return, episodes)
    wall_s: float
    last_step: int
    bin_size: int

    @property
    def last_eval(self) -> float | None:
        return self.eval_returns[-1] if self.eval_returns else None


def read_metrics(logdir) -> list[dict]:
    """Records of ``<logdir>/metrics.jsonl`` in file order; a line cut by a crash is skipped.
    Raises FileNotFoundError naming the file when it is missing."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {logdir} a training run directory?")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def learning_curve(records: Sequence[dict], bin_size: int = 10_000, name: str = "") -> Curve:
    """Eval points, binned training-episode means and wall time from logger records."""
    if bin_size <= 0:
        raise ValueError(f"bin_size must be a positive number of env steps; got {bin_size!r}")
    evals: dict[int, float] = {}  # a repeated step (older runs' final evaluation) counts once
    sums: dict[int, list[float]] = {}
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    for r in records:
        step = int(r["step"])
        if EVAL_KEY in r and math.isfinite(r[EVAL_KEY]):
            evals[step] = float(r[EVAL_KEY])
        if EPISODE_KEY in r and math.isfinite(r[EPISODE_KEY]):
            sums.setdefault(step // bin_size, []).append(float(r[EPISODE_KEY]))
    bins = [(b * bin_size, sum(v) / len(v), len(v)) for b, v in sorted(sums.items())]
    steps = sorted(evals)
    return Curve(name=name, eval_steps=steps, eval_returns=[evals[k] for k in steps], bins=bins,
                 wall_s=(max(times) - min(times)) if times else 0.0,
                 last_step=max((int(r["step"]) for r in records), default=0),
                 bin_size=bin_size)


def load_curve(logdir, bin_size: int = 10_000) -> Curve:
    return learning_curve(read_metrics(logdir), bin_size, name=os.path.basename(
        os.path.normpath(os.fspath(logdir))))


def format_curve(c: Curve) -> str:
    lines = [f"{c.name}: {c.last_step} env steps, {c.wall_s / 60:.1f} min between the first "
             f"and last record; last evaluation "
             + ("none" if c.last_eval is None else f"{c.last_eval:.0f}")]
    lines.append("  evaluation: " + (", ".join(
        f"{s // 1000}k {v:.0f}" for s, v in zip(c.eval_steps, c.eval_returns)) or "none"))
    lines.append("  training episodes (bin start: mean over n): " + (", ".join(
        f"{s // 1000}k {m:.0f} (n={n})" for s, m, n in c.bins) or "none"))
    return "\n".join(lines)


def write_csv(curves: Sequence[Curve], path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "kind", "env_step", "return", "episodes"])
        for c in curves:
            for s, v in zip(c.eval_steps, c.eval_returns):
                w.writerow([c.name, "eval", s, f"{v:.3f}", ""])
            for s, m, n in c.bins:
                w.writerow([c.name, "train_bin", s, f"{m:.3f}", n])


def plot_curves(curves: Sequence[Curve], path) -> None:
    from dali_jax.analysis.plots import pyplot, save
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for i, c in enumerate(curves):
        color = f"C{i}"
        ax.plot(c.eval_steps, c.eval_returns, "o-", color=color, label=f"{c.name} (eval)")
        if c.bins:
            ax.plot([s + c.bin_size / 2 for s, _, _ in c.bins], [m for _, m, _ in c.bins], "--",
                    color=color, alpha=0.6, label=f"{c.name} (training episodes)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training run directories (with metrics.jsonl)")
    p.add_argument("--bin", type=int, default=10_000, help="env steps per training bin")
    p.add_argument("--out", default=None, help="folder for curves.csv and curves.png")
    args = p.parse_args(argv)
    try:
        curves = [load_curve(r, args.bin) for r in args.runs]
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    for c in curves:
        print(format_curve(c))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(curves, os.path.join(args.out, "curves.csv"))
        plot_curves(curves, os.path.join(args.out, "curves.png"))
        print(f"wrote {os.path.join(args.out, 'curves.csv')} and curves.png")
    return 0

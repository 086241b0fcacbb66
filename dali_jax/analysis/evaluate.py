"""Zero-shot evaluation of a trained run on the evaluation grid, and random-policy references.

Policy evaluation::

    python -m dali_jax.evaluate --logdir RUN [RUN ...] [--episodes 50] [--mode sample|mode]
        [--num-envs 16] [--contexts all|scored|I,J,...] [--seed S] [--episode-length L]
        [--step N] [--task TASK] [--method-label NAME] [--serial|--parallel]
        [--random-reference FILE] [--expert-reference FILE]

loads the run's checkpoint (the latest, or ``--step``), runs ``--episodes`` episodes on every
selected context of the task's 84-context grid (``dali_jax.envs.contexts.evaluation_grid``) with
``--num-envs`` envs stepped together, and writes

* ``RUN/eval/returns.json``: the per-run results read by ``dali_jax.analysis.report`` (format in
  that module's docstring; extra keys: ``checkpoint_step``, ``episodes``, ``mode``,
  ``episode_length``, ``eval_seed``, and per context ``kind`` and ``regime``);
* ``RUN/eval/returns.csv``: one row per context, columns ``index, <factor 0>, <factor 1>, kind,
  regime, mean, std, n`` (``regime`` for the run's training setting, empty when not scored),
  plus ``random_return, score`` when ``--random-reference`` is given;

and prints the mean return per regime of the run's setting (with ``--random-reference``, also the
mean normalised score; Ball-in-Cup's expert return is 1000, Walker needs ``--expert-reference``).
With several runs, one that cannot be evaluated (no checkpoint, a corrupt one, no config) is
reported by name on stderr and the others are still evaluated; the exit status is then 2.

Random-policy references::

    python -m dali_jax.evaluate --random --task ball_in_cup --out FILE [--episodes 10]
        [--seeds 5] [--num-envs 16] [--contexts all|scored|I,J,...] [--episode-length 1000]

runs a uniform-random policy (actions uniform over the action box) for ``--seeds`` seeds on each
context and writes the reference cache of ``dali_jax.analysis.normalize`` (kind "random"): per
context, the max over seeds of the seed's mean return (docs/protocol.md).

Running the policies on the grid: ``dali_jax.analysis.policy_eval``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dali_jax import hostmem
from dali_jax.analysis.policy_eval import (DEFAULT_EPISODES, DEFAULT_NUM_ENVS,
                                           DEFAULT_RANDOM_EPISODES, DEFAULT_RANDOM_SEEDS,
                                           EvaluateError, evaluate_run, random_reference)

__all__ = ["write_results", "regime_summary", "main"]


def _run_task(logdir: str) -> str:
    from dali_jax.training.load import load_config_or_raise
    return load_config_or_raise(logdir, EvaluateError).task


def _normalizer(task: str, random_path: str | None, expert_path: str | None):
    if random_path is None:
        return None
    from dali_jax.analysis import normalize as NZ

    try:
        rnd = NZ.load_reference(random_path, kind="random", task=task)
        exp = None if expert_path is None else NZ.load_reference(expert_path, kind="expert",
                                                                task=task)
        return NZ.Normalizer(task, rnd, exp)
    except ValueError as e:  # ReferenceFileError and missing-expert errors
        raise EvaluateError(str(e)) from None


def _score(normalizer, mean: float, values) -> tuple[float | None, float | None]:
    if normalizer is None:
        return None, None
    try:
        rr = normalizer.random_return(values)
        return rr, normalizer.score(mean, values)
    except (KeyError, ValueError):
        return None, None


def write_results(logdir: str, result: Mapping, normalizer=None) -> tuple[Path, Path]:
    """Writes ``RUN/eval/returns.json`` and ``RUN/eval/returns.csv``. -> their paths."""
    from dali_jax.envs import contexts as C

    d = Path(logdir) / "eval"
    d.mkdir(parents=True, exist_ok=True)
    jpath, cpath = d / "returns.json", d / "returns.csv"
    tmp = jpath.with_name(jpath.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, jpath)
    f0, f1 = C.FACTORS[result["task"]]
    header = ["index", f0, f1, "kind", "regime", "mean", "std", "n"]
    if normalizer is not None:
        header += ["random_return", "score"]
    tmp = cpath.with_name(cpath.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for c in result["contexts"]:
            r = np.asarray(c["returns"], np.float64)
            row = [c["index"], f"{c['values'][f0]:g}", f"{c['values'][f1]:g}", c.get("kind", ""),
                   c.get("regime") or "", f"{r.mean():.6g}", f"{r.std():.6g}", len(r)]
            if normalizer is not None:
                rr, sc = _score(normalizer, float(r.mean()), c["values"])
                row += ["" if rr is None else f"{rr:.6g}", "" if sc is None else f"{sc:.6g}"]
            w.writerow(row)
    os.replace(tmp, cpath)
    return jpath, cpath


def regime_summary(result: Mapping, normalizer=None) -> list[dict]:
    """Rows ``{group, n, mean_return[, mean_score]}`` per regime of the run's setting (or, for
    default/specific runs, the training/default context), plus ``all evaluated``."""
    from dali_jax.envs import contexts as C

    task, setting = result["task"], result["setting"]
    groups: dict[str, list] = {}
    for c in result["contexts"]:
        reg = C.regime(task, setting, c["values"])
        if reg is not None:
            groups.setdefault(reg, []).append(c)
    ordered = [(g, groups[g]) for g in C.REGIMES if g in groups]
    if not ordered:
        ref = result.get("train_context") or C.DEFAULTS[task]
        name = "train context" if result.get("train_context") else "default context"
        same = [c for c in result["contexts"]
                if all(abs(c["values"][f] - float(ref[f])) < 1e-9 for f in C.FACTORS[task])]
        if same:
            ordered.append((name, same))
    ordered.append(("all evaluated", list(result["contexts"])))
    rows = []
    for name, cs in ordered:
        means = [float(np.mean(c["returns"])) for c in cs]
        row = {"group": name, "n": len(cs), "mean_return": float(np.mean(means))}
        if normalizer is not None:
            scores = [_score(normalizer, m, c["values"])[1] for m, c in zip(means, cs)]
            if all(s is not None for s in scores):
                row["mean_score"] = float(np.mean(scores))
        rows.append(row)
    return rows


def _format_summary(result: Mapping, rows: Sequence[dict], max_listed: int = 20) -> str:
    """The run's header, one line per context when there are at most `max_listed`, then
    one line per `regime_summary` row."""
    head = (f"{result['task']} {result['method']} ({result['obs']}) setting={result['setting']} "
            f"seed={result['seed']} step={result.get('checkpoint_step')} "
            f"episodes/context={result.get('episodes')} mode={result.get('mode')}")
    lines = [head]
    if len(result["contexts"]) <= max_listed:  # a short run of contexts: each on its line
        for c in result["contexts"]:
            vals = "  ".join(f"{k} {v:g}" for k, v in c["values"].items())
            ret = np.asarray(c["returns"], float)
            lines.append(f"    {vals:<34} {c.get('regime') or '-':<14} return "
                         f"{ret.mean():7.1f} (std {ret.std():.1f}, {len(ret)} episodes)")
    for r in rows:
        s = f"  {r['group']:<16} contexts={r['n']:>3}  mean return={r['mean_return']:8.1f}"
        if "mean_score" in r:
            s += f"  mean normalised score={r['mean_score']:.3f}"
        lines.append(s)
    if result.get("alignment"):  # how g_phi was trained
        lines.append("  alignment: " + " ".join(f"{k}={v}" for k, v in
                                                result["alignment"].items() if v is not None))
    return "\n".join(lines)

# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dali_jax.evaluate",
        description="Evaluate a run on the evaluation grid (writes RUN/eval/returns.json and "
                    "returns.csv), or compute random-policy reference returns (--random).")
    p.add_argument("--logdir", nargs="+",
                   help="run directory (with config.json and checkpoints/); several: each is "
                        "evaluated, one that cannot be is reported and skipped")
    p.add_argument("--random", action="store_true",
                   help="compute uniform-random-policy reference returns (needs --task, --out)")
    p.add_argument("--task", help="expected task of the run (error if it differs); the task "
                                  "of --random")
    p.add_argument("--out", help="--random: reference file to write")
    p.add_argument("--episodes", type=int, default=None,
                   help=f"episodes per context (default {DEFAULT_EPISODES}; "
                        f"{DEFAULT_RANDOM_EPISODES} per seed with --random)")
    p.add_argument("--seeds", type=int, default=DEFAULT_RANDOM_SEEDS,
                   help="--random: number of seeds (the reference is the max over seeds)")
    p.add_argument("--mode", default="sample", choices=("sample", "mode"),
                   help="sampled (default, as the release) or deterministic actions")
    p.add_argument("--num-envs", type=int, default=DEFAULT_NUM_ENVS,
                   help="envs stepped together")
    p.add_argument("--contexts", default="all",
                   help="'all' (84), 'scored' (those the run's setting scores) or grid indices "
                        "'I,J,...'")
    p.add_argument("--seed", type=int, default=None,
                   help="evaluation seed (default 10007 + the run's seed)")
    p.add_argument("--episode-length", type=int, default=None,
                   help="control steps per episode (default: the run's run.episode_length; "
                        "1000 with --random)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--method-label", default=None,
                   help="method name written to returns.json (default: config.method)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--parallel", dest="parallel", action="store_true", default=None,
                   help="envs in worker processes")
    g.add_argument("--serial", dest="parallel", action="store_false",
                   help="envs in this process")
    p.add_argument("--random-reference", default=None,
                   help="random-policy reference file: also report normalised scores")
    p.add_argument("--expert-reference", default=None,
                   help="expert reference file (needed for walker scores)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    return p


def _run(args) -> int:
    if args.random:
        if args.logdir:
            raise EvaluateError("--random computes reference returns; do not pass --logdir")
        if not args.task:
            raise EvaluateError("--random needs --task (ball_in_cup or walker)")
        if not args.out:
            raise EvaluateError("--random needs --out FILE (the reference file to write)")
        from dali_jax.analysis.normalize import save_reference

        episodes = DEFAULT_RANDOM_EPISODES if args.episodes is None else args.episodes
        length = 1000 if args.episode_length is None else args.episode_length
        ref = random_reference(args.task, episodes=episodes, seeds=args.seeds,
                               num_envs=args.num_envs, contexts=args.contexts,
                               episode_length=length, parallel=bool(args.parallel),
                               verbose=not args.quiet)
        save_reference(args.out, ref)
        if not args.quiet:
            rets = [e["return"] for e in ref.entries]
            print(f"random-policy returns of {args.task} on {len(rets)} contexts: mean "
                  f"{np.mean(rets):.1f}, min {np.min(rets):.1f}, max {np.max(rets):.1f} -> "
                  f"{args.out}")
        return 0
    if not args.logdir:
        raise EvaluateError("--logdir RUN is required (or --random --task T --out FILE)")
    if args.out:
        raise EvaluateError("--out is for --random; results go to RUN/eval/")
    if args.expert_reference is not None and args.random_reference is None:
        raise EvaluateError("--expert-reference needs --random-reference as well")
    if len(args.logdir) == 1:
        return _evaluate_one(args, args.logdir[0])
    failed = []
    for logdir in args.logdir:
        try:
            _evaluate_one(args, logdir)
        except EvaluateError as e:  # this run is damaged: report it, evaluate the others
            print(f"error: {logdir} not evaluated: {e}", file=sys.stderr)
            failed.append(logdir)
    if failed:
        print(f"error: {len(failed)} of {len(args.logdir)} runs not evaluated: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def _evaluate_one(args, logdir: str) -> int:
    norm = None
    if args.random_reference is not None:  # check the reference files before evaluating
        norm = _normalizer(_run_task(logdir), args.random_reference, args.expert_reference)
    episodes = DEFAULT_EPISODES if args.episodes is None else args.episodes
    result = evaluate_run(logdir, episodes=episodes, mode=args.mode,
                          num_envs=args.num_envs, contexts=args.contexts, seed=args.seed,
                          episode_length=args.episode_length, step=args.step, task=args.task,
                          parallel=args.parallel, method_label=args.method_label,
                          verbose=not args.quiet)
    jpath, cpath = write_results(logdir, result, norm)
    if not args.quiet:
        print(_format_summary(result, regime_summary(result, norm)))
        print(f"wrote {jpath} and {cpath}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a message on bad input)."""
    args = _parser().parse_args(argv)
    hostmem.tune_malloc()
    try:
        return _run(args)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

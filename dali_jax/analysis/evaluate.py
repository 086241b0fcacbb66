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
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dali_jax import hostmem
from dali_jax.config import alignment_summary
from dali_jax.methods import RECIPES

__all__ = ["EvaluateError", "select_contexts", "evaluate_run", "write_results",
           "regime_summary", "random_reference", "RandomPolicy", "main"]

DEFAULT_EPISODES = 50  # docs/protocol.md: the release runs 50 episodes per context
DEFAULT_RANDOM_EPISODES = 10
DEFAULT_RANDOM_SEEDS = 5
DEFAULT_NUM_ENVS = 16


class EvaluateError(ValueError):
    """Bad input to the evaluator (missing checkpoint, wrong task, bad flag value)."""


# ----------------------------------------------------------------------------- contexts
def select_contexts(task: str, which: str = "all", setting: str | None = None) -> list:
    """Grid contexts to evaluate: ``all`` (84), ``scored`` (those the training ``setting``
    scores) or a comma-separated list of grid indices. -> list of GridContext."""
    from dali_jax.envs import contexts as C

    grid = C.evaluation_grid(task)
    which = str(which).strip()
    if which == "all":
        return grid
    if which == "scored":
        if setting is None:
            raise EvaluateError("--contexts scored needs a run (its training setting decides "
                                "which contexts are scored)")
        out = [g for g in grid if C.regime(task, setting, g.values) is not None]
        if not out:
            raise EvaluateError(f"setting {setting!r} scores no grid context; use --contexts all")
        return out
    try:
        idx = [int(x) for x in which.split(",") if x.strip()]
    except ValueError:
        raise EvaluateError(f"--contexts must be 'all', 'scored' or comma-separated grid "
                            f"indices in [0, {len(grid) - 1}]; got {which!r}") from None
    if not idx:
        raise EvaluateError("--contexts: no index given")
    bad = [i for i in idx if not 0 <= i < len(grid)]
    if bad:
        raise EvaluateError(f"--contexts: indices {bad} out of range; the {task} grid has "
                            f"indices 0..{len(grid) - 1}")
    if len(set(idx)) != len(idx):
        raise EvaluateError(f"--contexts: duplicate indices in {which!r}")
    return [grid[i] for i in idx]


def _check_positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EvaluateError(f"{name} must be a positive integer; got {value!r}")


# ----------------------------------------------------------------------------- policy eval
def _load(logdir: str, step: int | None, task: str | None):
    from dali_jax.training.load import load_run_or_raise
    return load_run_or_raise(logdir, EvaluateError, step=step, task=task)


def _run_task(logdir: str) -> str:
    from dali_jax.training.load import load_config_or_raise
    return load_config_or_raise(logdir, EvaluateError).task


def _train_context(config) -> dict | None:
    if config.context_setting != "specific":
        return None
    from dali_jax.training.train import training_contexts

    (ctx,) = training_contexts(config).values()
    return {k: float(v) for k, v in ctx.items()}


def evaluate_run(logdir: str, episodes: int = DEFAULT_EPISODES, mode: str = "sample",
                 num_envs: int = DEFAULT_NUM_ENVS, contexts: str = "all",
                 seed: int | None = None, episode_length: int | None = None,
                 step: int | None = None, task: str | None = None,
                 parallel: bool | None = None, method_label: str | None = None,
                 verbose: bool = False) -> dict:
    """Evaluate a run on grid contexts. -> the ``returns.json`` dict (nothing is written).

    seed: env/action seed of the evaluation (default: 10007 + the run's seed, distinct from
    the training envs' seeds). episode_length: default the run's ``run.episode_length``.
    parallel: envs in worker processes (default: the run's ``run.parallel_envs``).
    """
    from dali_jax.envs import contexts as C
    from dali_jax.training.rollout import evaluate_contexts

    if mode not in ("sample", "mode"):
        raise EvaluateError(f"--mode must be 'sample' or 'mode'; got {mode!r}")
    _check_positive("--episodes", episodes)
    _check_positive("--num-envs", num_envs)
    _check_positive("--episode-length", episode_length, allow_none=True)
    run = _load(logdir, step, task)
    cfg = run.config
    if cfg.context_setting not in C.SETTINGS:
        raise EvaluateError(f"{logdir}: unknown context setting {cfg.context_setting!r}")
    chosen = select_contexts(cfg.task, contexts, cfg.context_setting)
    eval_seed = int(cfg.seed) + 10007 if seed is None else int(seed)
    length = int(cfg.run.episode_length) if episode_length is None else int(episode_length)
    par = bool(cfg.run.parallel_envs) if parallel is None else bool(parallel)
    t0 = time.time()
    bar = None
    if verbose:  # a progress bar over the grid's episodes, with ETA
        from tqdm import tqdm
        bar = tqdm(total=len(chosen) * episodes, desc="grid", unit="episode", file=sys.stderr)
    try:
        res = evaluate_contexts(run.agent, run.params, cfg.task, cfg.obs,
                                {g.index: dict(g.values) for g in chosen}, episodes=episodes,
                                num_envs=num_envs, seed=eval_seed, mode=mode, parallel=par,
                                episode_length=length,
                                progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    if verbose:
        print(f"evaluated {len(chosen)} contexts x {episodes} episodes in "
              f"{time.time() - t0:.1f} s", file=sys.stderr)
    out = {
        "task": cfg.task, "method": method_label or cfg.method,
        "setting": cfg.context_setting, "seed": int(cfg.seed), "obs": cfg.obs,
    }
    tc = _train_context(cfg)
    if tc is not None:
        out["train_context"] = tc
    if RECIPES[cfg.method].get("source") == "inferred":  # how g_phi was trained
        out["alignment"] = alignment_summary(cfg)
    out.update(checkpoint_step=int(run.step), episodes=int(episodes), mode=mode,
               episode_length=length, eval_seed=eval_seed)
    out["contexts"] = [
        {"index": g.index, "values": {k: float(v) for k, v in g.values.items()},
         "kind": g.kind, "regime": C.regime(cfg.task, cfg.context_setting, g.values),
         "returns": [float(r) for r in res[g.index]]}
        for g in chosen]
    return out


def _normalizer(task: str, random_path: str | None, expert_path: str | None):
    if random_path is None:
        return None
    from dali_jax.analysis import normalize as N

    try:
        rnd = N.load_reference(random_path, kind="random", task=task)
        exp = None if expert_path is None else N.load_reference(expert_path, kind="expert",
                                                                task=task)
        return N.Normalizer(task, rnd, exp)
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


# ----------------------------------------------------------------------------- random policy
class RandomPolicy:
    """Uniform-random actions over the box [low, high], in the agent interface that
    ``dali_jax.training.rollout.evaluate_contexts`` drives."""

    def __init__(self, low, high):
        self.low = np.asarray(low, np.float32)
        self.high = np.asarray(high, np.float32)

    def initial_carry(self, params, n: int) -> dict:
        return {}

    def policy_step(self, params, carry, obs, rng, mode="sample"):
        import jax

        n = int(np.shape(obs["is_first"])[0])
        u = np.asarray(jax.random.uniform(rng, (n,) + self.low.shape), np.float32)
        return self.low + u * (self.high - self.low), carry


def random_reference(task: str, episodes: int = DEFAULT_RANDOM_EPISODES,
                     seeds: int = DEFAULT_RANDOM_SEEDS, num_envs: int = DEFAULT_NUM_ENVS,
                     contexts: str = "all", episode_length: int = 1000, parallel: bool = False,
                     verbose: bool = False):
    """Random-policy reference returns per grid context (max over seeds of the mean return).
    -> ``dali_jax.analysis.normalize.ReferenceReturns`` (kind "random")."""
    from dali_jax.analysis.normalize import ReferenceReturns
    from dali_jax.envs import contexts as C
    from dali_jax.envs.dmc import make_env
    from dali_jax.training.rollout import evaluate_contexts

    if task not in C.FACTORS:
        raise EvaluateError(f"--task must be one of {', '.join(C.TASKS)}; got {task!r}")
    for name, v in (("--episodes", episodes), ("--seeds", seeds), ("--num-envs", num_envs),
                    ("--episode-length", episode_length)):
        _check_positive(name, v)
    if contexts == "scored":
        raise EvaluateError("--contexts scored needs a run; use 'all' or indices with --random")
    chosen = select_contexts(task, contexts)
    env = make_env(task, None, obs_mode="features", seed=0)
    try:
        policy = RandomPolicy(env.action_space.low, env.action_space.high)
    finally:
        env.close()
    per_seed = {g.index: [] for g in chosen}
    for s in range(seeds):
        t0 = time.time()
        res = evaluate_contexts(policy, None, task, "features",
                                {g.index: dict(g.values) for g in chosen}, episodes=episodes,
                                num_envs=num_envs, seed=s, mode="sample", parallel=parallel,
                                episode_length=episode_length)
        for g in chosen:
            per_seed[g.index].append(float(np.mean(res[g.index])))
        if verbose:
            print(f"random policy seed {s}: {len(chosen)} contexts x {episodes} episodes in "
                  f"{time.time() - t0:.1f} s", file=sys.stderr)
    names = C.FACTORS[task]
    return ReferenceReturns.from_seed_returns(
        task, "random", names, ((g.values, per_seed[g.index]) for g in chosen))


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

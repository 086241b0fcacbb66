"""Policy returns on the evaluation grid (``dali_jax.envs.contexts.evaluation_grid``): a trained
run's (``evaluate_run``, the dict of ``RUN/eval/returns.json``) and a uniform-random policy's
(``random_reference``, the reference cache of ``dali_jax.analysis.normalize``). Returns are
float lists, one per episode, per grid context. The CLI: ``dali_jax.analysis.evaluate``.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from dali_jax.config import alignment_summary
from dali_jax.methods import RECIPES

__all__ = ["EvaluateError", "select_contexts", "evaluate_run", "random_reference",
           "RandomPolicy"]

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


def _train_context(config) -> dict | None:
    if config.context_setting != "specific":
        return None
    from dali_jax.training.setup import training_contexts

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

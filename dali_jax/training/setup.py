"""What a run is set up from: its logdir, its training and evaluation contexts, the envs'
observation spec, the prefill's actions."""
from __future__ import annotations

import os

import numpy as np

from dali_jax.envs import contexts as C

FLAGS = ("is_first", "is_last", "is_terminal")


def write_text_atomic(path: str, text: str) -> None:
    """`path` holds either its old or its new content, never a cut one (a full disk)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def default_logdir(config) -> str:
    return os.path.join("runs", f"{config.task}_{config.method}_{config.obs}_"
                                f"{config.context_setting}_s{config.seed}")


def training_contexts(config) -> dict:
    """Context set of the run (id -> feature dict), reproducible from the seed."""
    specific = None
    if config.context_setting == "specific":
        f0, f1 = C.FACTORS[config.task]
        sc = config.specific_context
        specific = {f0: C.DEFAULTS[config.task][f0] if sc.factor_0 < 0 else sc.factor_0,
                    f1: C.DEFAULTS[config.task][f1] if sc.factor_1 < 0 else sc.factor_1}
    return C.make_context_set(config.task, config.context_setting, config.seed,
                              n=config.num_contexts, specific=specific)


def eval_contexts(config, count: int) -> dict:
    """A few held-out grid contexts for periodic evaluation: the default plus the most
    extreme double-grid corners of the task, up to `count`."""
    grid = C.evaluation_grid(config.task)
    default = [g for g in grid if all(abs(g.values[f] - C.DEFAULTS[config.task][f]) < 1e-9
                                      for f in C.FACTORS[config.task])]
    others = [g for g in grid if g.kind == "double"]
    others.sort(key=lambda g: -abs(C.normalize_context(config.task, g.values)).sum())
    chosen = (default + others)[:count]
    return {g.index: dict(g.values) for g in chosen}


def env_spec(space) -> dict:
    return {k: (tuple(s.shape), np.dtype(s.dtype)) for k, s in space.spaces.items()}


def prefill_action(seed: int, step: int, hold: int, low, high, shape) -> np.ndarray:
    """Uniform random action of the prefill for per-env control step `step`, (num_envs, A).

    Each draw is held for `hold` control steps (1: i.i.d. per step, as DreamerV3); seeded
    by (seed, step // hold), so a resumed run continues the same stream.
    """
    rng = np.random.default_rng([seed, step // hold])
    return rng.uniform(low, high, shape).astype(np.float32)

"""Helpers shared by the tests: tiny configs, specs and batches, and one tiny trained
Ball-in-Cup checkpoint shared by the analysis tests of one pytest run (`smoke_run`: smoke
preset, DALI-D, 2-dim context, 160 env steps, about 15 updates; trained on first use)."""
import json
from pathlib import Path

import numpy as np


def tiny_config(method="dali_d", **overrides):
    """A nano-sized config for tests: B=4, T=16, window 8, horizon 5."""
    from dali_jax import config as config_lib
    c = config_lib.get_config()
    c.method = method
    c.model.size = "nano"
    c.model.encdec_release_quirk = False
    c.train.batch_size, c.train.batch_length, c.train.imag_horizon = 4, 16, 5
    c.context.window, c.context.hidden, c.context.head_units = 8, 16, 16
    c.xla_opt_level = 0  # these tests are mostly compilation (see config.xla_opt_level)
    for key, value in overrides.items():
        config_lib.set_field(c, key, value)
    return c


def feature_spec(obs_dim=8, action_dim=2):
    from dali_jax.agent import Spec
    return Spec(obs={"obs": ((obs_dim,), np.float32), "context": ((2,), np.float32)},
                action_dim=action_dim)


def random_batch(spec, B=4, T=16, seed=0):
    """Synthetic (B, T) batch with an episode boundary in the middle."""
    rng = np.random.default_rng(seed)
    batch = {}
    for k, (shape, dtype) in spec.obs.items():
        if dtype == np.uint8:
            batch[k] = rng.integers(0, 255, (B, T) + tuple(shape), dtype=np.uint8)
        else:
            batch[k] = rng.normal(size=(B, T) + tuple(shape)).astype(np.float32)
    batch["action"] = rng.uniform(-1, 1, (B, T, spec.action_dim)).astype(np.float32)
    batch["reward"] = rng.uniform(0, 1, (B, T)).astype(np.float32)
    batch["is_first"] = np.zeros((B, T), bool)
    batch["is_first"][:, T // 2] = True
    batch["is_last"] = np.zeros((B, T), bool)
    batch["is_terminal"] = np.zeros((B, T), bool)
    return batch


_RUNS = {}


def smoke_config(logdir, method="dali_d", steps=160):
    from experiments import ball_in_cup

    cfg = ball_in_cup.get_config("smoke")
    cfg.method = method
    cfg.context.dim = 2
    cfg.run.steps = steps
    cfg.run.save_every_s = 1e9
    cfg.logdir = str(logdir)
    return cfg


def smoke_run(tmp_path_factory, method="dali_d") -> str:
    if method not in _RUNS:
        from dali_jax.training.train import train

        cfg = smoke_config(tmp_path_factory.mktemp(f"smoke_{method}") / "run", method)
        train(cfg)
        _RUNS[method] = cfg.logdir
    return _RUNS[method]


def write_run(root, task="ball_in_cup", method="dali", setting="double_box", seed=0,
              obs="features", ret=None, drop=(), **extra):
    """Write RUN/eval/returns.json over the full grid; ``ret(values, seed) -> mean return``."""
    from dali_jax.envs.contexts import evaluation_grid

    ret = ret or (lambda v, s: 500.0)
    d = Path(root) / f"{task}_{method}_{obs}_{setting}_{seed}"
    (d / "eval").mkdir(parents=True)
    ctx = [{"index": g.index, "values": g.values,
            "returns": [ret(g.values, seed) - 1.0, ret(g.values, seed) + 1.0]}
           for g in evaluation_grid(task) if g.index not in drop]
    body = {"task": task, "method": method, "setting": setting, "seed": seed, "obs": obs,
            "contexts": ctx, **extra}
    (d / "eval" / "returns.json").write_text(json.dumps(body))
    return d

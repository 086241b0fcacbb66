"""One tiny trained Ball-in-Cup checkpoint shared by the analysis tests of one pytest run.

`smoke_run(tmp_path_factory)` trains it on first use (smoke preset, DALI-D, 2-dim context,
160 env steps: ~15 updates) and returns its logdir; later calls in the same test run reuse it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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

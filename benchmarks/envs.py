"""Env steps/s per task for features and 64x64 pixels, single env and vectorised.

    python benchmarks/envs.py [--quick] [--num-envs 4] [--out FILE]

Each figure: warm-up, then the median over repeats of a timed block of random-action steps
(episode resets at the 1000-step limit included, contexts drawn from a double_box set).
Vectorised figures count the steps of all N envs (VectorEnv with worker processes).
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from dali_jax.envs.contexts import TASKS, make_context_set  # noqa: E402
from dali_jax.envs.dmc import make_env  # noqa: E402
from dali_jax.envs.vector import VectorEnv  # noqa: E402


def bench_single(task: str, mode: str, steps: int, repeats: int, warmup: int) -> float:
    """Median steps/s of one env."""
    env = make_env(task, make_context_set(task, "double_box", seed=0), obs_mode=mode)
    rng = np.random.default_rng(0)
    env.reset()
    shape = env.action_space.shape

    def run(n):
        for _ in range(n):
            _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, shape))
            if term or trunc:
                env.reset()

    run(warmup)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(steps)
        rates.append(steps / (time.perf_counter() - t))
    env.close()
    return statistics.median(rates)


def bench_vector(task: str, mode: str, n: int, steps: int, repeats: int, warmup: int) -> float:
    """Median total steps/s of n envs in worker processes."""
    ctxs = make_context_set(task, "double_box", seed=0)
    fns = [functools.partial(make_env, task, ctxs, mode, i) for i in range(n)]
    venv = VectorEnv(fns, parallel=True)
    rng = np.random.default_rng(0)
    shape = (n,) + venv.action_space.shape
    venv.reset()
    for _ in range(warmup):
        venv.step(rng.uniform(-1, 1, shape))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            venv.step(rng.uniform(-1, 1, shape))
        rates.append(n * steps / (time.perf_counter() - t))
    venv.close()
    return statistics.median(rates)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps (a smoke test, noisy)")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.quick:
        cfg = {"features": (200, 3, 50), "pixels": (50, 3, 10)}
    else:
        cfg = {"features": (2000, 5, 500), "pixels": (300, 5, 50)}
    n = args.num_envs
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}; {'quick' if args.quick else 'full'} run",
             "",
             f"| task | obs | single env (steps/s) | {n} envs in processes (total steps/s) |",
             "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for task in args.tasks:
        for mode, (steps, repeats, warmup) in cfg.items():
            single = bench_single(task, mode, steps, repeats, warmup)
            vec = bench_vector(task, mode, n, max(steps // n, 10), repeats, max(warmup // n, 5))
            row = f"| {task} | {mode} | {single:,.0f} | {vec:,.0f} |"
            print(row, flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

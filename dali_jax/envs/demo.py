"""Rolls out both tasks under several contexts with random actions and writes 64x64 frames.

    python -m dali_jax.envs.demo --out DIR [--steps 200] [--seed 0]

Writes DIR/<task>/<context>_t<step>.png, one contact sheet DIR/<task>_sheet.png per task
(rows: contexts, columns: time) and prints each rollout's return.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import imageio.v2 as imageio  # noqa: E402
import numpy as np  # noqa: E402

from dali_jax.envs.contexts import DEFAULTS, FACTORS  # noqa: E402
from dali_jax.envs.dmc import make_env  # noqa: E402

DEMO_CONTEXTS: dict[str, dict[str, dict[str, float]]] = {
    "ball_in_cup": {
        "default": {},
        "gravity_4.9": {"gravity": 4.9},
        "gravity_19.6": {"gravity": 19.6},
        "string_0.15": {"string_length": 0.15},
        "string_0.6": {"string_length": 0.6},
    },
    "walker": {
        "default": {},
        "gravity_4.9": {"gravity": 4.9},
        "gravity_19.6": {"gravity": 19.6},
        "strength_0.3": {"actuator_strength": 0.3},
        "strength_2.0": {"actuator_strength": 2.0},
    },
}


def rollout(task: str, context: dict, steps: int, seed: int, frame_steps: list[int]):
    """Random-action rollout. -> (return, {step: uint8 (64, 64, 3) frame})."""
    env = make_env(task, {0: context}, obs_mode="features", seed=seed)
    rng = np.random.default_rng(seed)
    env.reset()
    frames = {0: env.render()} if 0 in frame_steps else {}
    ret = 0.0
    for t in range(1, steps + 1):
        _, r, term, trunc, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        ret += r
        if t in frame_steps:
            frames[t] = env.render()
        if term or trunc:
            break
    env.close()
    return ret, frames


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for the PNG frames")
    p.add_argument("--steps", type=int, default=200, help="control steps per rollout")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    frame_steps = sorted({0, args.steps // 4, args.steps // 2, args.steps})
    start = time.perf_counter()
    for task, ctxs in DEMO_CONTEXTS.items():
        os.makedirs(os.path.join(args.out, task), exist_ok=True)
        rows = []
        print(f"{task}: {args.steps} random-action steps per context "
              f"(factors {FACTORS[task]}, defaults {DEFAULTS[task]})")
        for name, ctx in ctxs.items():
            ret, frames = rollout(task, ctx, args.steps, args.seed, frame_steps)
            for t, img in frames.items():
                imageio.imwrite(os.path.join(args.out, task, f"{name}_t{t:04d}.png"), img)
            rows.append(np.concatenate([frames[t] for t in frame_steps], axis=1))
            print(f"  {name:14s} return {ret:8.2f}")
        sheet = os.path.join(args.out, f"{task}_sheet.png")
        imageio.imwrite(sheet, np.concatenate(rows, axis=0))
        print(f"  frames in {os.path.join(args.out, task)}, contact sheet {sheet}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Time a trainer-sized checkpoint: save and restore of the agent state, the replay and the
RNG, as `Trainer.save` writes them.

    python benchmarks/checkpoint_io.py [--preset cpu] [--method dali_d] [--obs features]
        [--replay-steps 100000] [--repeats 5]

Prints the median seconds of a blocking save, of the caller's wait in a background save
(`blocking=False`, as the trainer's periodic saves), of a restore, and the checkpoint's
size on disk. An A/B
against another commit runs this file with PYTHONPATH pointing at a worktree of it.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dali_jax import presets  # noqa: E402
from dali_jax.agent import Agent  # noqa: E402
from dali_jax.training.checkpoint import Checkpointer  # noqa: E402
from dali_jax.training.load import spec_for  # noqa: E402
from dali_jax.training.replay import Replay  # noqa: E402


def trainer_tree(preset: str, method: str, obs: str, replay_steps: int) -> dict:
    """dict(agent, replay, rng) as the trainer checkpoints it; the replay filled with
    `replay_steps` env steps of random data."""
    c = presets.experiment_config("ball_in_cup", preset)
    c.method, c.obs, c.context_setting = method, obs, "single_0"
    spec = spec_for(c)
    agent = Agent(c, spec)
    state = jax.device_get(jax.jit(agent.init)(jax.random.PRNGKey(0)).state_dict())
    n = c.run.num_envs
    rspec = dict(spec.obs, action=((spec.action_dim,), np.float32), reward=((), np.float32),
                 is_first=((), bool), is_last=((), bool), is_terminal=((), bool))
    replay = Replay(replay_steps, n, rspec, seq_len=agent.sequence_length, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(replay_steps // n):
        replay.add({k: (rng.integers(0, 255, (n, *s), dtype=np.uint8) if d == np.uint8
                        else rng.random((n, *s)).astype(d)) for k, (s, d) in rspec.items()})
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    return dict(agent=state, replay=replay.state_dict(), rng=dict(key=key))


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--method", default="dali_d")
    p.add_argument("--obs", default="features", choices=("features", "pixels"))
    p.add_argument("--replay-steps", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    tree = trainer_tree(args.preset, args.method, args.obs, args.replay_steps)
    root = tempfile.mkdtemp(prefix="ckpt_io_")
    try:
        ck = Checkpointer(os.path.join(root, "checkpoints"), keep=2)
        saves, blocked, restores = [], [], []
        for i in range(args.repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            ck.save(2 * i + 1, tree, {"env_steps": i})
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            ck.save(2 * i + 2, tree, {"env_steps": i}, blocking=False)  # as the trainer does
            blocked.append(time.perf_counter() - t)
            ck.wait()
            t = time.perf_counter()
            ck.restore()
            restores.append(time.perf_counter() - t)
        size = du(ck.path(2 * args.repeats + 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"checkpoint of {args.preset} {args.method} {args.obs}, replay {args.replay_steps:,} "
          f"steps: {size / 2**20:.1f} MiB on disk; medians over {args.repeats} repeats: save "
          f"{statistics.median(saves[1:]):.3f} s, caller blocked by a background save "
          f"{statistics.median(blocked[1:]):.3f} s, restore "
          f"{statistics.median(restores[1:]):.3f} s")


if __name__ == "__main__":
    main()

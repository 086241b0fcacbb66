"""Run presets shared by the experiment files.

- paper: the DALI protocol (small DreamerV3 with the release's 5 x 1024 enc/dec MLPs,
  batch 16 x 64, train_ratio 512, 4 envs, K = 64); steps are set per task.
- quick: a CPU run of the featurized default context that finishes in minutes on a 2-core
  machine (a tiny model, shorter batches and window, lower train ratio, short episodes).
- cpu: the learning check on a 2-core CPU: featurized default context, 100k env steps,
  a "mini" model, train_ratio 128 and raised learning rates (fewer updates than the paper).
- smoke: seconds; used by the tests.
"""
from __future__ import annotations

NAMES = ("paper", "cpu", "quick", "smoke")


def apply(c, name: str):
    if name == "paper":
        return c
    if name == "cpu":
        c.method = "dreamer_dr"
        c.context_setting = "default"
        c.model.size = "mini"
        c.model.encdec_release_quirk = False
        c.train.model_lr = 3e-4
        c.train.actor_lr = 1e-4
        c.train.critic_lr = 1e-4
        c.run.steps = 100_000
        c.run.train_ratio = 128.0
        c.run.prefill = 2000
        c.run.num_envs = 4
        c.run.parallel_envs = False
        c.run.eval_every = 20_000
        c.run.eval_episodes = 2
        c.run.eval_contexts = 1
        c.run.log_every_s = 60.0
        c.run.save_every_s = 300.0
        return c
    if name == "quick":
        c.method = "dreamer_dr"
        c.context_setting = "default"
        c.model.size = "tiny"
        c.model.encdec_release_quirk = False
        c.train.batch_size = 16
        c.train.batch_length = 32
        c.context.window = 32
        c.train.model_lr = 3e-4
        c.train.actor_lr = 1e-4
        c.train.critic_lr = 1e-4
        c.run.steps = 20_000
        c.run.train_ratio = 64.0
        c.run.prefill = 1000
        c.run.num_envs = 2
        c.run.eval_every = 0
        c.run.eval_episodes = 2
        c.run.eval_contexts = 2
        c.run.log_every_s = 30.0
        c.run.save_every_s = 120.0
        return c
    if name == "smoke":
        c.model.size = "nano"
        c.model.encdec_release_quirk = False
        c.train.batch_size = 4
        c.train.batch_length = 16
        c.train.imag_horizon = 5
        c.context.window = 8
        c.context.hidden = 16
        c.context.head_units = 16
        c.run.steps = 400
        c.run.train_ratio = 16.0
        c.run.prefill = 100
        c.run.num_envs = 2
        c.run.eval_every = 0
        c.run.eval_episodes = 1
        c.run.eval_contexts = 1
        c.run.episode_length = 100
        c.run.parallel_envs = False
        c.run.replay_capacity = 10_000
        return c
    raise ValueError(f"preset must be one of {', '.join(NAMES)}; got {name!r}")

"""The training driver: envs -> replay -> agent.train_step, with logging, evaluation and
checkpoint/resume.

Loop (one iteration = one vector-env step of N envs):
  1. act: `policy_step` on the current params (random actions during prefill);
  2. store (obs_t, action_t, reward_t, flags_t) in the replay;
  3. dispatch the updates that are due (train_ratio replayed steps per env step, i.e.
     train_ratio / (B * T) updates per env step); JAX dispatch is asynchronous, so
  4. the envs step on the host while the device runs the updates; batches are sampled by
     a prefetch thread.
Checkpoints (agent state, replay, counters, RNG, env context schedules) are written every
`run.save_every_s`, on SIGINT/SIGTERM and at the end; starting again on the same logdir
resumes. `train(config)` returns a summary dict.

Failures (README, "Resuming"):
- an update with a non-finite loss term, gradient norm or batch input is skipped inside the
  jitted update (`train/nonfinite`); the trainer counts the skips
  (`train/nonfinite_skipped`), warns naming the offending terms, and `run.max_nonfinite`
  consecutive skips raise `NonFiniteError` without a final save. A state with a non-finite
  leaf is never checkpointed.
- a periodic save that fails is logged (naming the path) and retried after
  `run.save_every_s`; more than `run.max_save_failures` consecutive failures, or a failed
  final save, raise `CheckpointSaveError`. The earlier checkpoints stay as they were.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from dali_jax import config as config_lib
from dali_jax.agent import Agent, Spec
from dali_jax.agent import imagination
from dali_jax.envs.dmc import make_env
from dali_jax.envs.vector import VectorEnv
from dali_jax.training import parallel
from dali_jax.training.checkpoint import Checkpointer
from dali_jax.training.checkpointing import Checkpointing, NonFiniteError
from dali_jax.training.logger import Logger, Progress, nonfinite_terms
from dali_jax.training.replay import Prefetcher, Replay
from dali_jax.training.rollout import evaluation_scalars
from dali_jax.training.setup import (FLAGS, default_logdir, env_spec, eval_contexts,
                                     prefill_action, training_contexts, write_text_atomic)
from dali_jax.training.signals import GracefulStop

log = logging.getLogger("dali_jax.train")

@dataclasses.dataclass
class _Loop:
    """The training loop's running state (Trainer.run): timers, the pending updates' metrics,
    what the next log / evaluation / save is due after, recent episode returns."""
    last_log: float
    last_save: float
    steps_at_log: int
    eval_ctx: dict
    next_eval: Optional[int] = None
    last_eval: Optional[tuple] = None  # (env steps, scalars) of the latest periodic evaluation
    prefetch: Optional[object] = None
    pending: list = dataclasses.field(default_factory=list)  # the last dispatched updates
    metrics: Optional[dict] = None
    recent: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)
    timers: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("policy", "env", "dispatch", "replay_wait", "log", "eval"), 0.0))


class Trainer(Checkpointing):
    """Owns envs, replay, agent state, logger and checkpointer of one run."""

    def __init__(self, config: ml_collections.ConfigDict, env_factory: Optional[Callable] = None,
                 stop_after_env_steps: Optional[int] = None):
        config_lib.validate(config)
        self.config = config
        self.logdir = config.logdir or default_logdir(config)
        os.makedirs(self.logdir, exist_ok=True)
        self.stop_after = stop_after_env_steps
        run = config.run
        self.contexts = training_contexts(config)
        factory = env_factory or functools.partial(make_env, config.task)
        obs_mode = config.obs
        self.venv = VectorEnv([functools.partial(
            factory, contexts=self.contexts, obs_mode=obs_mode,
            seed=config.seed * 1000 + i, time_limit=run.episode_length)
            for i in range(run.num_envs)], parallel=run.parallel_envs)
        obs_spec = env_spec(self.venv.observation_space)
        act = self.venv.action_space
        self.action_low, self.action_high = act.low, act.high
        self.spec = Spec(obs=obs_spec, action_dim=int(np.prod(act.shape)))
        self.agent = Agent(config, self.spec)
        self.mesh = parallel.make_mesh(run.devices)
        self.train_step = parallel.sharded_train_step(self.agent, self.mesh,
                                                      config.train.batch_size)
        T = self.agent.sequence_length  # history for context windows + the training chunk
        rspec = dict(obs_spec)
        rspec.update(action=((self.spec.action_dim,), np.float32), reward=((), np.float32),
                     **{f: ((), bool) for f in FLAGS})
        self.replay = Replay(run.replay_capacity, run.num_envs, rspec, seq_len=T,
                             seed=config.seed)
        fp = dict(task=config.task, obs=config.obs, method=config.method,
                  model=config.model.to_dict(), context=config.context.to_dict())
        self.ckpt = Checkpointer(os.path.join(self.logdir, "checkpoints"), keep=2,
                                 fingerprint=fp)
        self.env_steps = 0
        self.updates = 0
        self.episodes = 0
        self.update_budget = 0.0
        self.nonfinite_skipped = 0  # updates skipped for non-finite values, in total
        self.nonfinite_streak = 0  # ... in a row, up to the latest checked update
        self.save_failures = 0  # consecutive failed periodic saves
        self.rng = jax.random.PRNGKey(config.seed)
        self.state = None
        write_text_atomic(os.path.join(self.logdir, "config.json"),
                           config.to_json_best_effort(indent=2))

    # The hot path's only host/device transfers are explicit: observations in, the action
    # and the previous updates' non-finite flags out, batches in (device_put in the prefetch
    # thread). `run.transfer_guard=disallow` makes any other transfer an error.
    def _act(self, carry, obs, pending):
        """One acting step for the N envs: (executed action (N, A) float32 numpy, carry,
        update key). Checks the `pending` updates' metrics (done: the action needed them)."""
        run = self.config.run
        with jax.transfer_guard(run.transfer_guard):
            self.rng, k_act, k_upd = jax.random.split(self.rng, 3)
            action, carry = self.agent.policy_step(self.state.params, carry,
                                                   jax.device_put(obs), k_act)
            action = np.asarray(jax.device_get(action))
            self._check_updates(pending)
            if self.env_steps < run.prefill:
                action = prefill_action(self.config.seed, self.env_steps // self.venv.num_envs,
                                        run.prefill_hold, self.action_low, self.action_high,
                                        action.shape)
            # The executed action is what the replay stores (world model, context tokens,
            # inverse targets) and what the acting carry continues from.
            action = np.clip(action, self.action_low, self.action_high).astype(np.float32)
            carry = self.agent.executed(carry, jax.device_put(action))
        return action, carry, k_upd

    def _update(self, prefetch, key, timers) -> list:
        """Dispatches the updates the budget allows (asynchronously); returns their metrics."""
        out = []
        with jax.transfer_guard(self.config.run.transfer_guard):
            while self.update_budget >= 1:
                tw = time.perf_counter()
                batch = next(prefetch)
                timers["replay_wait"] += time.perf_counter() - tw
                key, sub = jax.random.split(key)
                self.state, metrics = self.train_step(self.state, batch, sub)
                out.append(metrics)
                self.update_budget -= 1
                self.updates += 1
        return out

    def _check_updates(self, pending: list) -> None:
        """Counts the skipped (non-finite) updates among `pending` metrics dicts (updates
        already computed: the caller has synchronised on their state), warns with the
        offending terms at the first skip of a run of them, and raises NonFiniteError at
        `run.max_nonfinite` in a row."""
        if not pending:
            return
        flags = jax.device_get([m["train/nonfinite"] for m in pending])
        for m, flag in zip(pending, flags):
            if not flag:
                if self.nonfinite_streak:
                    log.warning("updates finite again after %d skipped in a row",
                                self.nonfinite_streak)
                self.nonfinite_streak = 0
                continue
            self.nonfinite_skipped += 1
            self.nonfinite_streak += 1
            limit = self.config.run.get("max_nonfinite", 100)
            if self.nonfinite_streak == 1 or self.nonfinite_streak >= limit:
                terms = nonfinite_terms(jax.device_get(m))
                if self.nonfinite_streak >= limit:
                    latest = self.ckpt.latest_step()
                    raise NonFiniteError(
                        f"{self.nonfinite_streak} consecutive updates had non-finite values "
                        f"(config.run.max_nonfinite={limit}); last one: {terms}. Stopping "
                        f"without saving; the latest checkpoint is "
                        f"{'none' if latest is None else self.ckpt.path(latest)}")
                log.warning("update skipped at %d env steps, train state kept: non-finite %s "
                            "(%d skipped in total; config.run.max_nonfinite=%d in a row stop "
                            "the run)", self.env_steps, terms, self.nonfinite_skipped, limit)

    # -------------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg, run = self.config, self.config.run
        resumed = self.restore_or_init()
        logger = Logger(self.logdir, purge_step=self.env_steps if resumed else None)
        progress = Progress(run.steps, initial=self.env_steps)
        loop = _Loop(last_log=time.time(), last_save=time.time(), steps_at_log=self.env_steps,
                     eval_ctx=eval_contexts(cfg, run.eval_contexts))
        if run.eval_every:
            loop.next_eval = (self.env_steps // run.eval_every + 1) * run.eval_every
        t_start = time.time()
        obs = self.venv.reset()
        carry = self.agent.initial_carry(self.state.params, self.venv.num_envs)
        stopped = False
        failed = None
        with GracefulStop() as stop:
            try:
                while self.env_steps < run.steps:
                    if stop.stop_requested() or (self.stop_after is not None
                                                 and self.env_steps >= self.stop_after):
                        stopped = True
                        break
                    obs, carry = self._iteration(loop, obs, carry, logger)
                    progress.update(self.env_steps, ret=np.mean(loop.recent)
                                    if loop.recent else None, upd=self.updates)
                    self._maybe_evaluate(loop, logger)
                    self._maybe_save(loop)
                jax.block_until_ready(self.state)
                self._check_updates(loop.pending)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                if loop.prefetch is not None:
                    loop.prefetch.close()
                saved = False
                try:
                    self._final_save(failed)
                    saved = True
                finally:
                    progress.close()
                    if failed is not None or not saved:  # the run ends with an error
                        logger.close()
                        self.venv.close()
        summary = loop.summary
        summary.update(env_steps=self.env_steps, updates=self.updates, episodes=self.episodes,
                       wall_s=time.time() - t_start, stopped=stopped, logdir=self.logdir,
                       timers=loop.timers)
        if not stopped:
            summary.update(self._final_evaluation(loop, logger))
            write_text_atomic(os.path.join(self.logdir, "eval_summary.json"), json.dumps(
                {k: v for k, v in summary.items() if k != "timers"} | {"timers": loop.timers},
                indent=2, default=float))
        logger.close()
        self.venv.close()
        return summary

    def _iteration(self, loop, obs, carry, logger):
        """One loop iteration: act, store, dispatch the due updates, step the envs, log.
        -> (next observations, acting carry)."""
        run, cfg = self.config.run, self.config.train
        t0 = time.perf_counter()
        action, carry, k_upd = self._act(carry, obs, loop.pending)
        loop.pending = []
        t1 = time.perf_counter()
        loop.timers["policy"] += t1 - t0
        self.replay.add({**{k: obs[k] for k in self.replay.spec if k in obs}, "action": action})
        if self.env_steps >= run.prefill:
            B, T = cfg.batch_size, cfg.batch_length
            self.update_budget += run.train_ratio / (B * T) * self.venv.num_envs
        if self.update_budget >= 1 and self.replay.can_sample():
            if loop.prefetch is None:
                loop.prefetch = Prefetcher(lambda: self.replay.sample(cfg.batch_size), depth=2,
                                           sharding=parallel.shardings(self.mesh)[1])
            loop.pending = self._update(loop.prefetch, k_upd, loop.timers)
            loop.metrics = loop.pending[-1] if loop.pending else loop.metrics
        t2 = time.perf_counter()
        loop.timers["dispatch"] += t2 - t1
        obs, finished = self.venv.step(action)
        loop.timers["env"] += time.perf_counter() - t2
        self.env_steps += self.venv.num_envs
        for ep in finished:
            self.episodes += 1
            loop.recent.append(ep.episode_return)
            logger.scalars(self.env_steps, {
                "episode/return": ep.episode_return, "episode/length": ep.length})
        self._maybe_log(loop, logger)
        return obs, carry

    def _maybe_log(self, loop, logger) -> None:
        """Scalars (and pixel runs' open-loop videos) every `run.log_every_s`, and at the end."""
        now = time.time()
        if now - loop.last_log < self.config.run.log_every_s and \
                self.env_steps < self.config.run.steps:
            return
        tl = time.perf_counter()
        scal = self._log_scalars(loop.metrics, loop.timers, now - loop.last_log,
                                 self.env_steps - loop.steps_at_log, loop.prefetch, loop.recent)
        logger.scalars(self.env_steps, scal)
        self._log_images(logger)
        loop.summary.update(scal)
        loop.recent = loop.recent[-20:]
        loop.last_log, loop.steps_at_log = now, self.env_steps
        loop.timers["log"] += time.perf_counter() - tl

    def _maybe_evaluate(self, loop, logger) -> None:
        """The periodic evaluation every `run.eval_every` env steps."""
        if loop.next_eval is None or self.env_steps < loop.next_eval:
            return
        te = time.perf_counter()
        ev = self.evaluate(loop.eval_ctx, self.config.run.eval_episodes)
        logger.scalars(self.env_steps, ev)
        loop.summary.update(ev)
        loop.last_eval = (self.env_steps, ev)
        loop.next_eval += self.config.run.eval_every
        loop.timers["eval"] += time.perf_counter() - te

    def _maybe_save(self, loop) -> None:
        """The periodic checkpoint every `run.save_every_s` (after the pending updates are
        checked: a non-finite state is never saved)."""
        if time.time() - loop.last_save < self.config.run.save_every_s:
            return
        jax.block_until_ready(self.state)
        self._check_updates(loop.pending)
        loop.pending = []
        self._periodic_save()
        loop.last_save = time.time()

    def _final_evaluation(self, loop, logger) -> dict:
        """The evaluation at the end (the periodic one's, when it just ran on these params)."""
        if loop.last_eval is not None and loop.last_eval[0] == self.env_steps:
            return loop.last_eval[1]
        final = self.evaluate(loop.eval_ctx, self.config.run.eval_episodes)
        logger.scalars(self.env_steps, final)
        return final

    def _log_images(self, logger):
        """Decoded vs true frames (open-loop report) for pixel runs."""
        if not self.agent.image_keys or not self.replay.can_sample():
            return
        if not hasattr(self, "_report_fn"):
            self._report_fn = jax.jit(functools.partial(imagination.openloop_strips,
                                                        self.agent))
        batch = self.replay.sample(min(2, self.config.train.batch_size),
                                   rng=np.random.default_rng(self.env_steps))
        strips = jax.device_get(self._report_fn(self.state.params, batch,
                                                jax.random.PRNGKey(self.env_steps)))
        logger.images(self.env_steps, {f"openloop/{k}": v for k, v in strips.items()})

    def _log_scalars(self, metrics, timers, dt, dsteps, prefetch, recent):
        out = {}
        if metrics is not None:
            out.update({k: float(v) for k, v in jax.device_get(metrics).items()})
        total = sum(timers.values()) or 1.0
        out.update({f"time/{k}_frac": v / total for k, v in timers.items()})
        out["time/env_steps_per_s"] = dsteps / max(dt, 1e-9)
        out["replay/size"] = len(self.replay)
        out["train/updates"] = self.updates
        out["train/nonfinite_skipped"] = self.nonfinite_skipped
        out["checkpoint/failed_saves"] = self.save_failures
        if prefetch is not None:
            out["time/prefetch_wait_frac"] = prefetch.wait_fraction()
        if recent:
            out["episode/return_recent"] = float(np.mean(recent))
        return out

    def evaluate(self, contexts: dict, episodes: int) -> dict:
        """Mean return per held-out context (sampled actions) -> scalars."""
        return evaluation_scalars(self.agent, jax.device_get(self.state.params), self.config,
                                  contexts, episodes, self.venv.num_envs)


def train(config, **kw) -> dict:
    """Runs (or resumes) a training run; returns its summary."""
    trainer = Trainer(config, **kw)
    return trainer.run()

"""The trainer's checkpoints: what a save holds, the resume, and the policy for failed saves
(`Trainer` inherits `Checkpointing`; the attributes it reads are the trainer's)."""
from __future__ import annotations

import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.training import parallel
from dali_jax.training.checkpoint import CheckpointSaveError
from dali_jax.training.resume import restore_checkpoint

log = logging.getLogger("dali_jax.train")


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values (the message names them); the latest
    checkpoint is the last one written before, never one holding non-finite values."""


class Checkpointing:
    """save / restore_or_init / _periodic_save / _final_save of a `Trainer` (its ckpt, state,
    replay, venv, rng, config and counters)."""

    def _selector_states(self):
        return [self.venv.call(i, "selector_state") for i in range(self.venv.num_envs)]

    def save(self, blocking: bool = True):
        """Checkpoints the run (with `blocking=False` the files are written in the background).
        Raises NonFiniteError (nothing written) when the agent state holds a non-finite value,
        CheckpointSaveError when the write (or the previous background write) fails."""
        agent = jax.device_get(self.state.state_dict())  # the checkpoint layout: plain dicts
        bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_flatten_with_path(agent)[0]
               if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all()]
        if bad:
            latest = self.ckpt.latest_step()
            raise NonFiniteError(
                f"not checkpointing a non-finite agent state at {self.env_steps} env steps "
                f"(leaves {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); the latest "
                f"checkpoint is "
                f"{'none' if latest is None else self.ckpt.path(latest)}")
        extra = dict(env_steps=self.env_steps, updates=self.updates, episodes=self.episodes,
                     update_budget=self.update_budget, selectors=self._selector_states(),
                     nonfinite_skipped=self.nonfinite_skipped,
                     nonfinite_streak=self.nonfinite_streak,
                     task=self.config.task, method=self.config.method, obs=self.config.obs,
                     context_setting=self.config.context_setting, seed=self.config.seed,
                     time=time.time())
        tree = dict(agent=agent, replay=self.replay.state_dict(),
                    rng=dict(key=np.asarray(jax.random.key_data(self.rng)
                                            if jnp.issubdtype(self.rng.dtype, jax.dtypes.prng_key)
                                            else self.rng)))
        self.ckpt.save(self.env_steps, tree, extra, blocking=blocking)
        log.info("checkpoint at %d env steps %s %s", self.env_steps,
                 "saved to" if blocking else "being written to", self.ckpt.path(self.env_steps))

    def restore_or_init(self):
        if self.ckpt.latest_step() is None:
            self.state = parallel.replicate(
                self.agent.init(jax.random.PRNGKey(self.config.seed)), self.mesh)
            return False
        step, tree, extra = restore_checkpoint(self.ckpt, self.agent)
        path = self.ckpt.path(step)
        self.state = parallel.replicate(tree["agent"], self.mesh)
        self.replay.load_state_dict(tree["replay"])
        self.rng = jnp.asarray(tree["rng"]["key"], jnp.uint32)
        self.env_steps = int(extra["env_steps"])
        self.updates = int(extra["updates"])
        self.episodes = int(extra["episodes"])
        self.update_budget = float(extra["update_budget"])
        self.nonfinite_skipped = int(extra.get("nonfinite_skipped", 0))
        self.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        for i, s in enumerate(extra.get("selectors", [])[:self.venv.num_envs]):
            self.venv.call(i, "load_selector_state", s)
        log.info("resumed from %s at %d env steps, %d updates", path, self.env_steps,
                 self.updates)
        return True

    def _periodic_save(self) -> None:
        """save(); a failed write is logged and tolerated `run.max_save_failures` times in a
        row (the next periodic save retries), then raised."""
        try:
            self.save(blocking=False)
        except CheckpointSaveError as exc:
            self.save_failures += 1
            limit = self.config.run.get("max_save_failures", 3)
            if self.save_failures > limit:
                raise CheckpointSaveError(
                    f"{exc} (failed {self.save_failures} times in a row, more than "
                    f"config.run.max_save_failures={limit}: stopping)") from exc
            log.error("%s; training continues and saves again in run.save_every_s=%gs "
                      "(failure %d of config.run.max_save_failures=%d in a row)", exc,
                      self.config.run.save_every_s, self.save_failures, limit)
        else:
            if self.save_failures:
                log.info("checkpoint saved again after %d failed save(s)", self.save_failures)
            self.save_failures = 0

    def _final_save(self, failed: Optional[BaseException]) -> None:
        """The end of a run (or a stop request, or an error): the background write in flight
        completed, then the final save; none after NonFiniteError; with another error in
        flight, a failed save is only logged."""
        if self.state is None:
            return
        try:
            self.ckpt.wait()
        except CheckpointSaveError as exc:
            log.error("%s", exc)
        if isinstance(failed, NonFiniteError):
            return
        jax.block_until_ready(self.state)
        try:
            self.save()
        except (CheckpointSaveError, NonFiniteError) as exc:
            if failed is None:
                raise
            log.error("final checkpoint not written: %s", exc)

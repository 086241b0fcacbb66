"""A small, fast, deterministic continuous-control task for end-to-end learning tests.

``PointMassEnv``: a damped 1-D point mass on a track [-1, 1] that must reach a target position
and stay there. Same interface as the DMC envs of ``dali_jax.envs.dmc`` (gymnasium API, dict
observations with ``obs`` float32 (2,) and ``context`` float32 (2,)), so ``VectorEnv`` and the
agent run on it unchanged. One step costs a few microseconds of numpy.

Dynamics per control step (action a in [-1, 1], clipped):
    v <- (1 - damping) * v + accel * gain * a
    x <- x + v;  at a wall (|x| > 1) x is clipped and v set to 0.
Reward on arriving at (x, v): r = (1 - min(|x - target|, 2) / 2) ** 2, dense, in [0, 1]; it
is 1 only at the target, so the maximum return needs the mass to get there fast and stay.
Episodes last ``time_limit`` steps (never terminal, truncated at the limit).
Start state: v = 0 and x uniform in ``start_range``, drawn from the env's seed (a fixed start
when the range is a single point), so episodes are deterministic given the seed and actions.

Observation: ``obs`` = (x, v / v_max) with v_max = accel * gain / damping the top speed;
``context`` = ((gain - 1) / 0.5, 0): the normalised gain (zeros at the default gain 1).

Helpers (pure numpy): ``random_policy_return`` (uniform random actions) and
``controller_return`` (a hand-tuned PD controller, a near-optimal reference) give the
reference returns that learning tests compare against.
"""
from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["PointMassEnv", "make_toy_env", "run_episode", "random_policy_return",
           "controller_return", "pd_controller"]


class PointMassEnv(gym.Env):
    """Damped 1-D point mass that must reach and stay at ``target`` (see module docstring).

    Args:
      seed: seeds the start positions of successive resets.
      target: target position in [-1, 1].
      start_range: (low, high) of the uniform start position.
      gain: actuator strength factor (the context; 1 is the default).
      time_limit: control steps per episode.
      damping, accel: velocity decay per step and acceleration per unit action.
    """

    metadata = {"render_modes": []}
    task = "point_mass_1d"

    def __init__(self, seed: int = 0, target: float = 0.5,
                 start_range: tuple[float, float] = (-0.9, -0.6), gain: float = 1.0,
                 time_limit: int = 50, damping: float = 0.2, accel: float = 0.02):
        if not -1.0 <= target <= 1.0:
            raise ValueError(f"target must be in [-1, 1], got {target}")
        lo, hi = start_range
        if not -1.0 <= lo <= hi <= 1.0:
            raise ValueError(f"start_range must satisfy -1 <= low <= high <= 1, got {start_range}")
        if gain <= 0 or time_limit < 1 or not 0.0 < damping <= 1.0 or accel <= 0:
            raise ValueError("gain, accel > 0, time_limit >= 1 and damping in (0, 1] required")
        self.target = float(target)
        self.start_range = (float(lo), float(hi))
        self.gain = float(gain)
        self.time_limit = int(time_limit)
        self.damping = float(damping)
        self.accel = float(accel)
        self.v_max = self.accel * self.gain / self.damping
        self.context_id = 0
        self.context = {"gain": self.gain}
        self._context_obs = np.array([(self.gain - 1.0) / 0.5, 0.0], np.float32)
        self._rng = np.random.default_rng(seed)
        self.observation_space = spaces.Dict({
            "context": spaces.Box(-np.inf, np.inf, (2,), np.float32),
            "obs": spaces.Box(-np.inf, np.inf, (2,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.x = 0.0
        self.v = 0.0
        self._t = 0
        self._needs_reset = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """-> (obs dict, info). ``seed`` restarts the start-position stream."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        lo, hi = self.start_range
        self.x = float(self._rng.uniform(lo, hi)) if hi > lo else lo
        self.v = 0.0
        self._t = 0
        self._needs_reset = False
        return self._obs(), {"context_id": self.context_id}

    def step(self, action):
        """-> (obs, reward, terminated=False, truncated, info)."""
        if self._needs_reset:
            raise RuntimeError("step() called before reset() or after the episode ended")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (1,) or not np.isfinite(a[0]):
            raise ValueError(f"action must be 1 finite value, got {action!r}")
        a = float(np.clip(a[0], -1.0, 1.0))
        self.v = (1.0 - self.damping) * self.v + self.accel * self.gain * a
        self.x += self.v
        if abs(self.x) > 1.0:
            self.x = float(np.clip(self.x, -1.0, 1.0))
            self.v = 0.0
        self._t += 1
        truncated = self._t >= self.time_limit
        self._needs_reset = truncated
        return self._obs(), self.reward(self.x), False, truncated, {"context_id": 0}

    def reward(self, x: float) -> float:
        d = min(abs(x - self.target), 2.0)
        return float((1.0 - d / 2.0) ** 2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"obs": np.array([self.x, self.v / self.v_max], np.float32),
                "context": self._context_obs.copy()}

    def close(self) -> None:
        pass


def make_toy_env(seed: int = 0, **kw) -> PointMassEnv:
    """Picklable factory (use with functools.partial for VectorEnv)."""
    return PointMassEnv(seed=seed, **kw)


def run_episode(env: PointMassEnv, policy: Callable[[dict], Any]) -> float:
    """Return of one episode of ``policy(obs dict) -> action`` from ``env.reset()``."""
    obs, _ = env.reset()
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        done = terminated or truncated
    return total


def random_policy_return(episodes: int = 100, seed: int = 0, **env_kw) -> float:
    """Mean return of uniform random actions over ``episodes`` episodes of one env
    (``PointMassEnv(seed=seed, **env_kw)``); actions drawn from default_rng((seed, 1))."""
    env = PointMassEnv(seed=seed, **env_kw)
    rng = np.random.default_rng((seed, 1))
    return float(np.mean([run_episode(env, lambda _: rng.uniform(-1, 1, (1,)))
                          for _ in range(episodes)]))


def pd_controller(env: PointMassEnv, kp: float = 8.0, kd: float = 2.0):
    """Saturated PD controller on (x, v / v_max): a near-optimal reference policy (with the
    default env, its mean return ~41.1 is within 1% of the best full-throttle / full-brake
    schedule followed by PD hold, ~41.3; uniform random actions get ~8.5)."""
    def policy(obs):
        x, v = float(obs["obs"][0]), float(obs["obs"][1])
        return np.array([np.clip(kp * (env.target - x) - kd * v, -1.0, 1.0)], np.float32)
    return policy


def controller_return(episodes: int = 20, seed: int = 0, **env_kw) -> float:
    """Mean return of ``pd_controller`` over ``episodes`` episodes (a near-maximal return)."""
    env = PointMassEnv(seed=seed, **env_kw)
    policy = pd_controller(env)
    return float(np.mean([run_episode(env, policy) for _ in range(episodes)]))

"""Contextual DeepMind Control tasks with contexts applied to the live MuJoCo model.

``BallInCupEnv`` (catch) and ``WalkerEnv`` (walk) load dm_control's suite XML once and, at each
reset, write the selected context into the live ``mujoco.MjModel`` (about 40 us, no XML rebuild).
Stepping, observations and rewards follow dm_control's suite exactly (legacy step: mj_step2,
mj_step x (n-1), mj_step1). ``CARLDMCAdapter`` exposes any carl-bench DMC env (Finger, Fish,
PointMass, Quadruped, Walker; these rebuild their XML per context) through the same interface.

Observation dict: ``obs`` float32 (D,) state vector (ball_in_cup D=8, walker D=24),
``context`` float32 (2,) normalised varied factors, ``image`` uint8 (64, 64, 3) camera 0.
obs_mode "features" -> {obs, context}; "pixels" -> {image, context}; "both" -> all three.

Modules: ``live_env`` (the live-model base), ``live_tasks`` (the two tasks), ``carl_dmc``
(the adapter), ``context_env`` (what they share), ``rendering`` (the 64x64 renderer).
"""
from __future__ import annotations

from typing import Any, Mapping

import gymnasium as gym

from dali_jax.envs.carl_dmc import CARLDMCAdapter
from dali_jax.envs.live_env import ContextualDMCEnv
from dali_jax.envs.live_tasks import BallInCupEnv, WalkerEnv

LIVE_ENVS: dict[str, type[ContextualDMCEnv]] = {"ball_in_cup": BallInCupEnv,
                                                "walker": WalkerEnv}


def make_env(task: str, contexts: Mapping[Any, Mapping[str, float]] | None = None,
             obs_mode: str = "features", seed: int = 0, context_selector=None, **kw) -> gym.Env:
    """Builds a contextual env: "ball_in_cup" / "walker" (live model) or a carl-bench DMC env
    ("finger", "fish", "pointmass", "quadruped", "carl_walker" or a CARLDmc*Env class name)."""
    if task in LIVE_ENVS:
        return LIVE_ENVS[task](contexts=contexts, obs_mode=obs_mode, seed=seed,
                               context_selector=context_selector, **kw)
    return CARLDMCAdapter(task, contexts=contexts, obs_mode=obs_mode, seed=seed,
                          context_selector=context_selector, **kw)

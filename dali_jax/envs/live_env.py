"""``ContextualDMCEnv``: a dm_control suite task whose context is written into the live
``mujoco.MjModel`` at reset (about 40 us, no XML rebuild); stepping follows dm_control's suite
exactly (legacy step: mj_step2, mj_step x (n-1), mj_step1). The tasks: ``live_tasks``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Mapping

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from dali_jax.envs import contexts as C  # noqa: E402
from dali_jax.envs.context_env import (  # noqa: E402
    EPISODE_STEPS, OBS_MODES, ContextMixin, warn_instability)
from dali_jax.envs.rendering import FastRenderer  # noqa: E402

_BAD_WARNINGS = np.array([int(mujoco.mjtWarning.mjWARN_BADQACC),
                          int(mujoco.mjtWarning.mjWARN_BADQPOS),
                          int(mujoco.mjtWarning.mjWARN_BADQVEL)])


def _suite_xml(name: str) -> str:
    """Path of a dm_control suite XML, found without importing dm_control.suite."""
    spec = importlib.util.find_spec("dm_control")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "dm_control is required for the DMC tasks: pip install dm-control==1.0.50 (on "
            "Python 3.13, where labmaze has no wheel: pip install --no-deps dm-control==1.0.50; "
            "scripts/bootstrap.sh does this)")
    return os.path.join(list(spec.submodule_search_locations)[0], "suite", name)


class ContextualDMCEnv(ContextMixin, gym.Env):
    """Base class of the live-model contextual DMC tasks (gymnasium API, CARL-style contexts).

    Args:
      contexts: {context id: {feature: value}}; None -> {0: defaults}. Validated here.
      obs_mode: "features" | "pixels" | "both".
      seed: seeds the initial-state randomisation and the ``RoundRobin`` over contexts.
      context_selector: None (a randomised ``RoundRobin``), an object with ``.next()`` or a
        callable returning a context id.
      image_size, camera: rendering settings (64, camera 0).
      time_limit: control steps per episode (1000).
    """

    task: str = ""
    xml_file: str = ""
    control_timestep: float = 0.0
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, contexts: Mapping[Any, Mapping[str, float]] | None = None,
                 obs_mode: str = "features", seed: int = 0, context_selector=None,
                 image_size: int = 64, camera: int | str = 0, time_limit: int = EPISODE_STEPS):
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if contexts is None:
            contexts = {0: dict(C.DEFAULTS[self.task])}
        if len(contexts) == 0:
            raise ValueError("contexts must not be empty")
        self.contexts = {k: C.validate_context(self.task, v) for k, v in contexts.items()}
        self._context_obs = {k: C.normalize_context(self.task, v)
                             for k, v in self.contexts.items()}
        self.context_features: tuple[str, ...] = tuple(C.FACTORS[self.task])
        self.obs_mode = obs_mode
        self.image_size = image_size
        self.camera = camera
        self.time_limit = int(time_limit)
        self.render_mode = "rgb_array"

        self.model = mujoco.MjModel.from_xml_path(_suite_xml(self.xml_file))
        self.data = mujoco.MjData(self.model)
        self._base = self._snapshot()
        self._applied: dict[str, float] | None = None
        self._n_sub = self._n_substeps()
        self._setup_ids()
        self._setup_contexts(seed, context_selector)

        self._renderer: FastRenderer | None = None
        self._t = 0
        self._needs_reset = True
        self._warn_base = np.zeros(len(_BAD_WARNINGS), np.int64)

        nobs = self._observe_state().shape[0]
        obs_spaces = {"context": spaces.Box(-np.inf, np.inf, (len(self.context_features),),
                                            np.float32)}
        if obs_mode in ("features", "both"):
            obs_spaces["obs"] = spaces.Box(-np.inf, np.inf, (nobs,), np.float32)
        if obs_mode in ("pixels", "both"):
            obs_spaces["image"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        lo, hi = self.model.actuator_ctrlrange.T
        self.action_space = spaces.Box(lo.astype(np.float32), hi.astype(np.float32),
                                       dtype=np.float32)

    # -- task hooks -------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the model fields that contexts edit."""
        m = self.model
        return {"gravity": m.opt.gravity.copy()}

    def _setup_ids(self) -> None:
        pass

    def _n_substeps(self) -> int:
        return int(round(self.control_timestep / self.model.opt.timestep))

    def _apply_context(self, ctx: Mapping[str, float]) -> None:
        raise NotImplementedError

    def _initialize_episode(self) -> None:
        raise NotImplementedError

    def _observe_state(self) -> np.ndarray:
        raise NotImplementedError

    def _reward(self) -> float:
        raise NotImplementedError

    # -- gymnasium API ----------------------------------------------------------------------
    @classmethod
    def get_context_features(cls) -> dict[str, tuple[float, C.Interval]]:
        """Every accepted context feature: name -> (default, valid interval)."""
        return dict(C.FEATURES[cls.task])

    @classmethod
    def get_default_context(cls) -> dict[str, float]:
        """Default values of the two varied factors."""
        return dict(C.DEFAULTS[cls.task])

    def _forward_no_actuation(self) -> None:
        m = self.model
        old = m.opt.disableflags
        m.opt.disableflags = old | int(mujoco.mjtDisableBit.mjDSBL_ACTUATION)
        try:
            mujoco.mj_forward(m, self.data)
        finally:
            m.opt.disableflags = old

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Selects a context, applies it, samples an initial state. -> (obs dict, info)."""
        if seed is not None:
            self._reseed(seed)
        cid = self._choose_context(options)
        ctx = self.contexts[cid]
        self.context_id, self.context = cid, dict(ctx)
        if self._applied != ctx:
            self._apply_context(ctx)
            self._applied = dict(ctx)
            self._n_sub = self._n_substeps()
        mujoco.mj_resetData(self.model, self.data)
        self._forward_no_actuation()
        self._initialize_episode()
        self._forward_no_actuation()
        self._t = 0
        self._needs_reset = False
        self._warn_counts = self.data.warning.number
        self._warn_base = self._warn_counts[_BAD_WARNINGS].copy()
        self._warn_total = int(self._warn_base.sum())
        return self._obs(), {"context_id": cid}

    def step(self, action):
        """One control step. -> (obs, reward, terminated=False, truncated, info)."""
        if self._needs_reset:
            raise RuntimeError("step() called before reset() or after the episode ended")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.model.nu or not math.isfinite(float(a.sum())):
            raise ValueError(f"action must be {self.model.nu} finite values, got {action!r}")
        m, d = self.model, self.data
        d.ctrl[:] = a
        error = None
        try:
            mujoco.mj_step2(m, d)
            if self._n_sub > 1:
                mujoco.mj_step(m, d, self._n_sub - 1)
            mujoco.mj_step1(m, d)
        except Exception as e:  # MuJoCo error under extreme contexts
            error = f"{type(e).__name__}: {e}"
        self._t += 1
        wn = self._warn_counts  # live view of data.warning.number
        unstable = (error is not None
                    or int(wn[_BAD_WARNINGS[0]] + wn[_BAD_WARNINGS[1]] + wn[_BAD_WARNINGS[2]])
                    > self._warn_total
                    or not math.isfinite(float(d.qpos.sum() + d.qvel.sum())))
        info: dict[str, Any] = {"context_id": self.context_id}
        if unstable:
            counts = wn[_BAD_WARNINGS]
            names = [n for n, c, b in zip(("BADQACC", "BADQPOS", "BADQVEL"), counts,
                                          self._warn_base) if c > b]
            warn_instability(
                f"{self.task}: physics unstable at step {self._t} under context "
                f"{self.context} ({error or ', '.join(names) or 'non-finite state'}); "
                "episode truncated")
            info["unstable"] = True
            reward = 0.0
        else:
            reward = float(self._reward())
        truncated = unstable or self._t >= self.time_limit
        self._needs_reset = truncated
        return self._obs(), reward, False, truncated, info

    def render(self) -> np.ndarray:
        """uint8 (image_size, image_size, 3) frame of the camera."""
        if self._renderer is None:
            self._renderer = FastRenderer(self.model, self.image_size, self.camera,
                                           self._straight_tendon())
        return self._renderer.render(self.data)

    def _straight_tendon(self) -> tuple[int, int, int] | None:
        return None

    def _obs(self) -> dict[str, np.ndarray]:
        return self._make_obs(self._observe_state)

    # -- state access (tests, cross-checks) ---------------------------------------------------
    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Sets qpos/qvel and recomputes derived quantities as after a reset."""
        self.data.qpos[:] = qpos
        self.data.qvel[:] = qvel
        self._forward_no_actuation()

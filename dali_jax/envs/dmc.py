"""Contextual DeepMind Control tasks with contexts applied to the live MuJoCo model.

``BallInCupEnv`` (catch) and ``WalkerEnv`` (walk) load dm_control's suite XML once and, at each
reset, write the selected context into the live ``mujoco.MjModel`` (about 40 us, no XML rebuild).
Stepping, observations and rewards follow dm_control's suite exactly (legacy step: mj_step2,
mj_step x (n-1), mj_step1). ``CARLDMCAdapter`` exposes any carl-bench DMC env (Finger, Fish,
PointMass, Quadruped, Walker; these rebuild their XML per context) through the same interface.

Observation dict: ``obs`` float32 (D,) state vector (ball_in_cup D=8, walker D=24),
``context`` float32 (2,) normalised varied factors, ``image`` uint8 (64, 64, 3) camera 0.
obs_mode "features" -> {obs, context}; "pixels" -> {image, context}; "both" -> all three.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import math
import os
import warnings
import weakref
from typing import Any, Callable, Mapping

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from dali_jax.envs import contexts as C  # noqa: E402

log = logging.getLogger(__name__)

OBS_MODES = ("features", "pixels", "both")
EPISODE_STEPS = 1000

_BAD_WARNINGS = np.array([int(mujoco.mjtWarning.mjWARN_BADQACC),
                          int(mujoco.mjtWarning.mjWARN_BADQPOS),
                          int(mujoco.mjtWarning.mjWARN_BADQVEL)])


class PhysicsInstabilityWarning(RuntimeWarning):
    """Emitted when an episode is cut short by a numerical instability."""


def warn_instability(message: str) -> None:
    """Logs and warns about an instability (``PhysicsInstabilityWarning``)."""
    log.warning(message)
    warnings.warn(message, PhysicsInstabilityWarning, stacklevel=3)


def _suite_xml(name: str) -> str:
    """Path of a dm_control suite XML, found without importing dm_control.suite."""
    spec = importlib.util.find_spec("dm_control")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "dm_control is required for the DMC tasks: pip install dm-control==1.0.50 (on "
            "Python 3.13, where labmaze has no wheel: pip install --no-deps dm-control==1.0.50; "
            "scripts/bootstrap.sh does this)")
    return os.path.join(list(spec.submodule_search_locations)[0], "suite", name)


# ---------------------------------------------------------------------------------------------
# Fast 64x64 offscreen rendering.

_LIVE_RENDERERS: "weakref.WeakSet[_FastRenderer]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_renderers() -> None:
    """Frees the GL contexts before mujoco's EGL atexit hook terminates the display."""
    for r in list(_LIVE_RENDERERS):
        r.close()


class _FastRenderer:
    """mujoco.Renderer at (size, size) with shadows and multisampling off -> uint8 (H, W, 3).

    ``straight_tendon=(site_a, site_b, tendon_id)`` draws that tendon as one straight capsule
    between the two sites instead of MuJoCo 3's sagging catenary (dozens of segments, 2-3x
    slower to rasterise); MuJoCo 2, used by the DALI release, drew it straight.
    """

    def __init__(self, model: mujoco.MjModel, size: int = 64, camera: int | str = 0,
                 straight_tendon: tuple[int, int, int] | None = None):
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = size
        model.vis.global_.offheight = size
        self.model = model
        self.camera = camera
        self._r: mujoco.Renderer | None = mujoco.Renderer(model, size, size)
        self._option = None
        self._tendon = straight_tendon
        if straight_tendon is not None:
            self._option = mujoco.MjvOption()
            self._option.flags[mujoco.mjtVisFlag.mjVIS_TENDON] = 0
            tid = straight_tendon[2]
            self._t_width = float(model.tendon_width[tid])
            self._t_rgba = model.tendon_rgba[tid].astype(np.float32)
        _LIVE_RENDERERS.add(self)
        global _ATEXIT_REGISTERED
        if not _ATEXIT_REGISTERED:  # after mujoco's own hook, so that it runs before it
            atexit.register(_close_renderers)
            _ATEXIT_REGISTERED = True

    def render(self, data: mujoco.MjData) -> np.ndarray:
        self._r.update_scene(data, camera=self.camera, scene_option=self._option)
        if self._tendon is not None:
            scene = self._r.scene
            if scene.ngeom < scene.maxgeom:
                g = scene.geoms[scene.ngeom]
                mujoco.mjv_initGeom(g, mujoco.mjtGeom.mjGEOM_CAPSULE, np.zeros(3), np.zeros(3),
                                    np.eye(3).ravel(), self._t_rgba)
                mujoco.mjv_connector(g, mujoco.mjtGeom.mjGEOM_CAPSULE, self._t_width,
                                     data.site_xpos[self._tendon[0]],
                                     data.site_xpos[self._tendon[1]])
                scene.ngeom += 1
        return self._r.render()

    def close(self) -> None:
        if self._r is not None:
            try:
                self._r.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
            self._r = None


# ---------------------------------------------------------------------------------------------
# Context selection shared by the live envs and the CARL adapter.

class _ContextMixin:
    """Context bookkeeping, observation assembly and ``close()`` shared by the live envs and
    the CARL adapter (both set ``obs_mode``, ``_context_obs`` and ``_renderer``).

    ``context_selector`` is a ``RoundRobin`` (checkpoint it with ``state_dict()``), or the
    object with ``.next()`` / callable returning a context id that the caller passed.
    """

    def _setup_contexts(self, seed: int, context_selector) -> None:
        if context_selector is not None and not (hasattr(context_selector, "next")
                                                 or callable(context_selector)):
            raise TypeError("context_selector must be None, an object with .next() or a "
                            "callable returning a context id")
        self._custom_selector = context_selector is not None
        self.context_selector = context_selector
        self._reseed(seed)
        self.context_id = None
        self.context: dict[str, float] = {}

    def _reseed(self, seed: int) -> None:
        env_ss, sel_ss = np.random.SeedSequence(seed).spawn(2)
        self._np_random = np.random.default_rng(env_ss)
        # Initial states use dm_control's RandomState draws: same seed -> same states as
        # dm_control's suite task built with random=seed.
        self._init_random = np.random.RandomState(seed)
        if not self._custom_selector:
            self.context_selector = C.RoundRobin(list(self.contexts),
                                                 np.random.default_rng(sel_ss))

    def selector_state(self):
        """Checkpointable state of the context schedule (None for a custom selector)."""
        sel = self.context_selector
        return sel.state_dict() if hasattr(sel, "state_dict") else None

    def load_selector_state(self, state) -> None:
        """Restores `selector_state()` output (ignored when None)."""
        if state is not None and hasattr(self.context_selector, "load_state_dict"):
            self.context_selector.load_state_dict(state)

    def _choose_context(self, options: Mapping | None):
        if options is not None and options.get("context_id") is not None:
            cid = options["context_id"]
            if cid not in self.contexts:
                raise KeyError(f"unknown context id {cid!r}; known ids: {list(self.contexts)[:10]}"
                               f"{'...' if len(self.contexts) > 10 else ''}")
            return cid
        sel = self.context_selector
        cid = sel.next() if hasattr(sel, "next") else sel()
        if cid not in self.contexts:
            raise KeyError(f"context_selector returned unknown context id {cid!r}")
        return cid

    # -- observation and cleanup shared by the live envs and the CARL adapter ------------------
    def _make_obs(self, get_state: Callable[[], Any]) -> dict[str, np.ndarray]:
        """Observation dict for `obs_mode`; `get_state()` (called only when the mode has
        features) gives the state vector, whose non-finite entries become 0."""
        out = {"context": self._context_obs[self.context_id].copy()}
        if self.obs_mode != "pixels":
            state = np.asarray(get_state(), np.float64)
            if not math.isfinite(float(state.sum())):
                state = np.nan_to_num(state, nan=0.0, posinf=0.0, neginf=0.0)
            out["obs"] = state.astype(np.float32)
        if self.obs_mode != "features":
            out["image"] = self.render()
        return out

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


# ---------------------------------------------------------------------------------------------
# Live-model tasks.

class ContextualDMCEnv(_ContextMixin, gym.Env):
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

        self._renderer: _FastRenderer | None = None
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
            self._renderer = _FastRenderer(self.model, self.image_size, self.camera,
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


class BallInCupEnv(ContextualDMCEnv):
    """Ball-in-Cup catch; context: gravity, string_length (docs/protocol.md's catch_context).

    string_length L sets the tendon "string" range to (0, L) and shifts the ball body's z by
    (0.3 - L). obs (8,): cup x, z, ball x, z positions, then their 4 velocities. Action (2,).
    Reward 1 while the ball is in the cup (returns in [0, 1000]); control step 0.02 s.
    """

    task = "ball_in_cup"
    xml_file = "ball_in_cup.xml"
    control_timestep = 0.02
    _MAX_INIT_TRIES = 1000

    def _setup_ids(self) -> None:
        m = self.model
        self._ball = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "ball")
        self._string = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_TENDON, "string")
        self._target = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "target")
        ball_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "ball")
        self._ball_qx = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "ball_x")]
        self._ball_qz = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "ball_z")]
        self._margin = m.site_size[self._target, [0, 2]] - m.geom_size[ball_geom, 0]

    def _straight_tendon(self):
        m = self.model
        return (mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "cup"),
                mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "ball"), self._string)

    def _snapshot(self):
        out = super()._snapshot()
        m = self.model
        ball = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "ball")
        out["ball_z"] = float(m.body_pos[ball, 2])
        return out

    def _apply_context(self, ctx):
        m = self.model
        m.opt.gravity[:] = self._base["gravity"]
        m.opt.gravity[2] = -ctx["gravity"]
        length = ctx["string_length"]
        m.tendon_range[self._string] = (0.0, length)
        m.body_pos[self._ball, 2] = self._base["ball_z"] + (0.3 - length)
        mujoco.mj_setConst(m, self.data)

    def _initialize_episode(self):
        # Collision-free random ball position, as dm_control's BallInCup.
        rng, d = self._init_random, self.data
        for _ in range(self._MAX_INIT_TRIES):
            d.qpos[self._ball_qx] = rng.uniform(-0.2, 0.2)
            d.qpos[self._ball_qz] = rng.uniform(0.2, 0.5)
            self._forward_no_actuation()
            if d.ncon == 0:
                return
        log.warning("ball_in_cup: no collision-free initial ball position found under %s",
                    self.context)

    def _observe_state(self):
        d = self.data
        return np.concatenate([d.qpos, d.qvel])

    def _reward(self):
        target, ball = self.data.site_xpos[self._target], self.data.xpos[self._ball]
        return float(abs(target[0] - ball[0]) < self._margin[0]
                     and abs(target[2] - ball[2]) < self._margin[1])

    def in_target(self) -> float:
        """1.0 if the ball is in the cup."""
        return self._reward()


def _tolerance_gaussian(x: float, lower: float, margin: float, value_at_margin: float) -> float:
    """dm_control rewards.tolerance(x, (lower, inf), margin) with the gaussian sigmoid.
    numpy's log/sqrt/exp, as dm_control uses: on CPUs where numpy's SIMD kernels differ from
    libm's by an ulp (seen with AVX-512), `math` would not reproduce its rewards exactly."""
    if x >= lower:
        return 1.0
    scale = np.sqrt(-2.0 * np.log(value_at_margin))
    dist = (lower - x) / margin
    return float(np.exp(-0.5 * (dist * scale) ** 2))


def _tolerance_linear(x: float, lower: float, margin: float, value_at_margin: float) -> float:
    """dm_control rewards.tolerance(x, (lower, inf), margin) with the linear sigmoid."""
    if x >= lower:
        return 1.0
    scaled = (lower - x) / margin * (1.0 - value_at_margin)
    return 1.0 - scaled if abs(scaled) < 1.0 else 0.0


class WalkerEnv(ContextualDMCEnv):
    """Planar Walker walk; context: gravity, actuator_strength (+ every carl-bench feature).

    Feature semantics equal carl-bench's XML edits on walker.xml: actuator_strength, friction_*,
    joint_damping, joint_stiffness and geom_density scale the model's values (walker.xml has no
    joint stiffness, so joint_stiffness has no effect, as in CARL); gravity, timestep, density,
    viscosity and wind_* are set. obs (24,): 14 orientations, torso height, 9 velocities.
    Action (6,). Control step 0.025 s (10 physics steps at the default timestep).
    """

    task = "walker"
    xml_file = "walker.xml"
    control_timestep = C.WALKER_CONTROL_TIMESTEP
    _STAND_HEIGHT = 1.2
    _WALK_SPEED = 1.0

    def _setup_ids(self):
        m = self.model
        self._torso = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "torso")
        sid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SENSOR, "torso_subtreelinvel")
        self._vel_adr = int(m.sensor_adr[sid])

    def _snapshot(self):
        out = super()._snapshot()
        m = self.model
        out.update(gear=m.actuator_gear[:, 0].copy(), friction=m.geom_friction.copy(),
                   damping=m.dof_damping.copy(), stiffness=m.jnt_stiffness.copy(),
                   mass=m.body_mass.copy(), inertia=m.body_inertia.copy(),
                   timestep=float(m.opt.timestep), density=float(m.opt.density),
                   viscosity=float(m.opt.viscosity), wind=m.opt.wind.copy(),
                   meaninertia=float(m.stat.meaninertia), meanmass=float(m.stat.meanmass))
        return out

    def _apply_context(self, ctx):
        m, b = self.model, self._base
        g = lambda k: ctx.get(k, C.FEATURES["walker"][k][0])  # noqa: E731
        m.opt.gravity[:] = b["gravity"]
        m.opt.gravity[2] = -g("gravity")
        m.actuator_gear[:, 0] = b["gear"] * g("actuator_strength")
        m.geom_friction[:] = b["friction"] * np.array(
            [g("friction_tangential"), g("friction_torsional"), g("friction_rolling")])
        m.dof_damping[:] = b["damping"] * g("joint_damping")
        m.jnt_stiffness[:] = b["stiffness"] * g("joint_stiffness")
        m.opt.timestep = g("timestep")
        m.opt.density = g("density")
        m.opt.viscosity = g("viscosity")
        m.opt.wind[:] = (g("wind_x"), g("wind_y"), g("wind_z"))
        # Every walker geom takes the default density, so masses and inertias scale with it.
        gd = g("geom_density")
        m.body_mass[:] = b["mass"] * gd
        m.body_inertia[:] = b["inertia"] * gd
        mujoco.mj_setConst(m, self.data)  # refreshes dof_M0, invweight0, actuator_acc0, ...
        if gd == 1.0:
            m.stat.meaninertia, m.stat.meanmass = b["meaninertia"], b["meanmass"]
        else:  # as the compiler computes them (the solver scales its tolerance by meaninertia)
            m.stat.meaninertia = float(np.mean(m.dof_M0))
            m.stat.meanmass = float(np.mean(m.body_mass[1:]))

    def _initialize_episode(self):
        # dm_control's randomize_limited_and_rotational_joints for hinge/slide joints.
        m, d, rng = self.model, self.data, self._init_random
        hinge, slide = int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE)
        for j in range(m.njnt):
            adr, jtype = int(m.jnt_qposadr[j]), int(m.jnt_type[j])
            if jtype not in (hinge, slide):
                continue  # walker has no ball or free joints
            if m.jnt_limited[j]:
                lo, hi = m.jnt_range[j]
                d.qpos[adr] = rng.uniform(lo, hi)
            elif jtype == hinge:
                d.qpos[adr] = rng.uniform(-np.pi, np.pi)

    def _observe_state(self):
        # orientations: xx, xz of every body but the world (14); torso height; qvel (9)
        d, nb = self.data, self.model.nbody - 1
        out = np.empty(2 * nb + 1 + self.model.nv)
        out[:2 * nb].reshape(nb, 2)[:] = d.xmat[1:, 0:3:2]
        out[2 * nb] = d.xpos[self._torso, 2]
        out[2 * nb + 1:] = d.qvel
        return out

    def _reward(self):
        d = self.data
        height = d.xpos[self._torso, 2]
        standing = _tolerance_gaussian(height, self._STAND_HEIGHT, self._STAND_HEIGHT / 2, 0.1)
        upright = (1.0 + d.xmat[self._torso, 8]) / 2.0
        stand = (3.0 * standing + upright) / 4.0
        move = _tolerance_linear(d.sensordata[self._vel_adr], self._WALK_SPEED,
                                 self._WALK_SPEED / 2, 0.5)
        return stand * (5.0 * move + 1.0) / 6.0


# ---------------------------------------------------------------------------------------------
# carl-bench adapter.

CARL_ENVS: dict[str, str] = {
    "finger": "CARLDmcFingerEnv",
    "fish": "CARLDmcFishEnv",
    "pointmass": "CARLDmcPointMassEnv",
    "quadruped": "CARLDmcQuadrupedEnv",
    "carl_walker": "CARLDmcWalkerEnv",
}


def import_carl_dmc():
    """carl.envs.dmc, imported without its warnings about unrelated optional packages."""
    # record=True swallows them even though carl calls warnings.simplefilter("once") itself.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        import carl.envs.dmc as carl_dmc  # heavy (about 1 s), only when needed
    return carl_dmc


@contextlib.contextmanager
def _quiet_configspace():
    """ConfigSpace warns when normalising CARL's infinite feature bounds; harmless."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        yield


def _carl_class(name: str):
    carl_dmc = import_carl_dmc()
    cls_name = CARL_ENVS.get(name, name)
    if not hasattr(carl_dmc, cls_name):
        raise ValueError(f"unknown carl-bench DMC env {name!r}; expected one of "
                         f"{sorted(CARL_ENVS)} or {sorted(CARL_ENVS.values())}")
    if cls_name == "CARLDmcQuadrupedEnv" and not hasattr(np, "in1d"):
        # carl-bench 1.1.1's quadruped calls np.in1d, removed in NumPy 2.4; isin is equivalent
        # for its 1-D arguments.
        np.in1d = np.isin
    return getattr(carl_dmc, cls_name)


class CARLDMCAdapter(_ContextMixin, gym.Env):
    """Any carl-bench DMC env behind the observation dict of ``ContextualDMCEnv``.

    CARL applies a context by rebuilding the XML at reset. ``context`` observes
    ``context_features`` (default: the features named in any given context), normalised with
    ``context_ranges`` (name -> (lo, hi); default: min/max over the context set; a constant
    feature maps to 0). Values are checked against CARL's feature bounds.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env: str | type, contexts: Mapping[Any, Mapping[str, float]] | None = None,
                 obs_mode: str = "features", seed: int = 0, context_selector=None,
                 context_features: tuple[str, ...] | None = None,
                 context_ranges: Mapping[str, tuple[float, float]] | None = None,
                 image_size: int = 64, camera: int | str = 0):
        import_carl_dmc()
        from carl.context.selection import CustomSelector

        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        cls = _carl_class(env) if isinstance(env, str) else env
        self.task = cls.__name__
        with _quiet_configspace():
            feats = cls.get_context_features()
            defaults = cls.get_default_context()
        contexts = {0: {}} if contexts is None else contexts
        if len(contexts) == 0:
            raise ValueError("contexts must not be empty")
        self.contexts = {k: self._validate(feats, v) for k, v in contexts.items()}
        if context_features is None:
            named = set().union(*[set(v) for v in contexts.values()])
            context_features = tuple(n for n in feats if n in named)
        self.context_features = tuple(context_features)
        ranges = dict(context_ranges or {})
        for n in self.context_features:
            if n not in ranges:
                vals = [c.get(n, defaults[n]) for c in self.contexts.values()]
                ranges[n] = (min(vals), max(vals))
        self.context_ranges = ranges
        self._context_obs = {k: self._normalise(v, defaults) for k, v in self.contexts.items()}

        self._keys = list(self.contexts)
        self._pending = 0

        def select(inst):
            key = self._keys[self._pending]
            return inst.contexts[key], self._pending

        with _quiet_configspace():
            self._carl = cls(contexts=dict(self.contexts), obs_context_as_dict=True,
                             context_selector=CustomSelector(contexts=dict(self.contexts),
                                                             selector_function=select))
        self._task_random = np.random.RandomState(seed)
        orig_update = self._carl._update_context

        def update_context():  # seed dm_control's task RNG after each rebuild
            orig_update()
            self._carl.env.env.task._random = self._task_random

        self._carl._update_context = update_context
        self._setup_contexts(seed, context_selector)
        self.obs_mode = obs_mode
        self.image_size = image_size
        self.camera = camera
        self.render_mode = "rgb_array"
        self._renderer: _FastRenderer | None = None
        self._needs_reset = True

        base = self._carl.base_observation_space
        obs_spaces = {"context": spaces.Box(-np.inf, np.inf, (len(self.context_features),),
                                            np.float32)}
        if obs_mode in ("features", "both"):
            obs_spaces["obs"] = spaces.Box(-np.inf, np.inf, base.shape, np.float32)
        if obs_mode in ("pixels", "both"):
            obs_spaces["image"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        act = self._carl.action_space
        self.action_space = spaces.Box(act.low.astype(np.float32), act.high.astype(np.float32),
                                       dtype=np.float32)

    def _validate(self, feats, values) -> dict[str, float]:
        out = {}
        for name, raw in values.items():
            if name not in feats:
                raise ValueError(f"unknown context feature {name!r} for {self.task}; "
                                 f"known features: {sorted(feats)}")
            f = feats[name]
            lo, hi = getattr(f, "lower", -math.inf), getattr(f, "upper", math.inf)
            try:
                v = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"context feature {name!r} of {self.task} must be a number in "
                                 f"[{lo}, {hi}], got {raw!r}") from None
            if not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"context feature {name!r} of {self.task} = {v} is outside its "
                                 f"valid range [{lo}, {hi}]")
            out[name] = v
        return out

    def _normalise(self, ctx, defaults) -> np.ndarray:
        out = np.zeros(len(self.context_features), np.float32)
        for i, n in enumerate(self.context_features):
            lo, hi = self.context_ranges[n]
            c = ctx.get(n, defaults[n])
            out[i] = 0.0 if hi - lo < 1e-12 else 2.0 * (c - lo) / (hi - lo) - 1.0
        return out

    @property
    def physics(self):
        """The current dm_control Physics (rebuilt by CARL when the context changes)."""
        return self._carl.env.env.physics

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._reseed(seed)
            self._task_random = np.random.RandomState(seed)
            self._carl.env.env.task._random = self._task_random
        cid = self._choose_context(options)
        self._pending = self._keys.index(cid)
        state, _ = self._carl.reset()
        self.context_id, self.context = cid, dict(self.contexts[cid])
        self._needs_reset = False
        return self._obs(state["obs"]), {"context_id": cid}

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("step() called before reset() or after the episode ended")
        info: dict[str, Any] = {"context_id": self.context_id}
        try:
            state, reward, terminated, truncated, _ = self._carl.step(
                np.asarray(action, np.float64))
            obs = state["obs"]
            reward = float(reward or 0.0)
        except Exception as e:  # dm_control PhysicsError under extreme contexts
            warn_instability(f"{self.task}: physics unstable under context {self.context} "
                             f"({type(e).__name__}: {e}); episode truncated")
            obs = np.zeros(self._carl.base_observation_space.shape)
            reward, terminated, truncated = 0.0, False, True
            info["unstable"] = True
        self._needs_reset = bool(terminated or truncated)
        return self._obs(obs), reward, bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        model = self.physics.model.ptr
        if self._renderer is None or self._renderer.model is not model:
            if self._renderer is not None:
                self._renderer.close()
            self._renderer = _FastRenderer(model, self.image_size, self.camera)
        return self._renderer.render(self.physics.data.ptr)

    def _obs(self, state) -> dict[str, np.ndarray]:
        return self._make_obs(lambda: state)


# ---------------------------------------------------------------------------------------------

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

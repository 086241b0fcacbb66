"""``CARLDMCAdapter``: any carl-bench DMC env (Finger, Fish, PointMass, Quadruped, Walker; these
rebuild their XML per context) behind the observation dict of the live envs."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dali_jax.envs.context_env import OBS_MODES, ContextMixin, warn_instability
from dali_jax.envs.rendering import FastRenderer

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


class CARLDMCAdapter(ContextMixin, gym.Env):
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
        self._renderer: FastRenderer | None = None
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
            self._renderer = FastRenderer(model, self.image_size, self.camera)
        return self._renderer.render(self.physics.data.ptr)

    def _obs(self, state) -> dict[str, np.ndarray]:
        return self._make_obs(lambda: state)

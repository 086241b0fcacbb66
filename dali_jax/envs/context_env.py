"""What the contextual DMC envs share: observation modes, the physics-instability warning, and
``ContextMixin`` (context selection, observation dict assembly, ``close()``).

Observation dict: ``obs`` float32 (D,) state vector, ``context`` float32 (F,) normalised
varied factors, ``image`` uint8 (64, 64, 3). obs_mode "features" -> {obs, context};
"pixels" -> {image, context}; "both" -> all three.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from dali_jax.envs import contexts as C

log = logging.getLogger(__name__)

OBS_MODES = ("features", "pixels", "both")
EPISODE_STEPS = 1000


class PhysicsInstabilityWarning(RuntimeWarning):
    """Emitted when an episode is cut short by a numerical instability."""


def warn_instability(message: str) -> None:
    """Logs and warns about an instability (``PhysicsInstabilityWarning``)."""
    log.warning(message)
    warnings.warn(message, PhysicsInstabilityWarning, stacklevel=3)


class ContextMixin:
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

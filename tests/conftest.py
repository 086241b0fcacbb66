"""Shared test set-up: headless rendering, CPU JAX with a persistent compilation cache."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))

from dali_jax import hostmem  # noqa: E402

hostmem.tune_malloc()  # before the first computation (see dali_jax/hostmem.py)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

from tests.helpers import feature_spec, tiny_config  # noqa: E402

_AGENTS = {}


@pytest.fixture(scope="session")
def agent_cache():
    """(method, extra overrides as a tuple) -> Agent, built once per test run so jitted
    functions are compiled once."""
    from dali_jax.agent import Agent

    def get(method, **overrides):
        key = (method, tuple(sorted(overrides.items())))
        if key not in _AGENTS:
            _AGENTS[key] = Agent(tiny_config(method, **overrides), feature_spec())
        return _AGENTS[key]
    return get

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def tiny_config(method="dali_d", **overrides):
    """A nano-sized config for tests: B=4, T=16, window 8, horizon 5."""
    from dali_jax import config as config_lib
    c = config_lib.get_config()
    c.method = method
    c.model.size = "nano"
    c.model.encdec_release_quirk = False
    c.train.batch_size, c.train.batch_length, c.train.imag_horizon = 4, 16, 5
    c.context.window, c.context.hidden, c.context.head_units = 8, 16, 16
    c.xla_opt_level = 0  # these tests are mostly compilation (see config.xla_opt_level)
    for key, value in overrides.items():
        config_lib.set_path(c, key, value)
    return c


def feature_spec(obs_dim=8, action_dim=2):
    from dali_jax.agent import Spec
    return Spec(obs={"obs": ((obs_dim,), np.float32), "context": ((2,), np.float32)},
                action_dim=action_dim)


def random_batch(spec, B=4, T=16, seed=0):
    """Synthetic (B, T) batch with an episode boundary in the middle."""
    rng = np.random.default_rng(seed)
    batch = {}
    for k, (shape, dtype) in spec.obs.items():
        if dtype == np.uint8:
            batch[k] = rng.integers(0, 255, (B, T) + tuple(shape), dtype=np.uint8)
        else:
            batch[k] = rng.normal(size=(B, T) + tuple(shape)).astype(np.float32)
    batch["action"] = rng.uniform(-1, 1, (B, T, spec.action_dim)).astype(np.float32)
    batch["reward"] = rng.uniform(0, 1, (B, T)).astype(np.float32)
    batch["is_first"] = np.zeros((B, T), bool)
    batch["is_first"][:, T // 2] = True
    batch["is_last"] = np.zeros((B, T), bool)
    batch["is_terminal"] = np.zeros((B, T), bool)
    return batch


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

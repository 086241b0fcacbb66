"""The GPU/TPU path, checked on CPU: the update and acting step lower for `cuda` and `tpu`
with no custom call (no CPU-only kernel, no host callback), and a bfloat16 update trains.

The trainer's hot path under `jax.transfer_guard("disallow")` is tested in test_train.py
(`run.transfer_guard`), the data-parallel update on 4 forced devices there too."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from tests.helpers import feature_spec, random_batch, tiny_config
from dali_jax.agent import Agent, Spec

PIXELS = Spec(obs={"image": ((64, 64, 3), np.uint8), "context": ((2,), np.float32)},
              action_dim=2)


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


@pytest.mark.parametrize("obs", ["features", "pixels"])
@pytest.mark.parametrize("method", ["dreamer_dr", "dali_d"])
def test_train_and_policy_step_export_for_cuda_and_tpu(obs, method):
    # What an accelerator runs under the defaults: bfloat16 compute, native convolutions.
    c = tiny_config(method, compute_dtype="bfloat16", **{"model.conv_impl": "native"})
    c.obs = obs
    spec = feature_spec() if obs == "features" else PIXELS
    agent = Agent(c, spec)
    state = jax.eval_shape(agent.init, jax.random.PRNGKey(0))
    batch = _shapes(random_batch(spec, T=agent.sequence_length))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    platforms = ("cuda", "tpu")
    update = export.export(agent.train_step, platforms=platforms)(state, batch, key)
    carry = jax.eval_shape(functools.partial(agent.initial_carry, n=3), state.params)
    obs_in = {k: jax.ShapeDtypeStruct((3,) + s, d) for k, (s, d) in spec.obs.items()}
    obs_in["is_first"] = jax.ShapeDtypeStruct((3,), jnp.bool_)
    act = export.export(agent.policy_step, platforms=platforms)(state.params, carry,
                                                                obs_in, key)
    for ex in (update, act):
        assert ex.platforms == platforms
        text = ex.mlir_module()
        assert "custom_call" not in text and "callback" not in text
    # The update really is the bfloat16 one: its matmuls take bfloat16 operands.
    assert "bf16" in update.mlir_module()


def test_bfloat16_update_trains_and_starts_where_float32_does(agent_cache):
    """A nano DALI-D trained on one fixed batch for 50 updates in float32 and in bfloat16:
    every bfloat16 step finite, the first step's losses within 2% (relative) of float32's,
    and each world-model term and the alignment loss fall in bfloat16 by at least 80% of
    what they fall in float32 (the reference is the float32 run, not a fixed factor: how far
    a term falls in 50 updates depends on the architecture, not on the dtype)."""
    first, last = {}, {}
    for dtype in ("float32", "bfloat16"):
        if dtype == "float32" and jax.default_backend() == "cpu":
            agent = agent_cache("dali_d")  # the shared compiled one (auto = float32 here)
        else:
            agent = Agent(tiny_config("dali_d", compute_dtype=dtype), feature_spec())
        batch = random_batch(agent.spec, T=agent.sequence_length)
        state = agent.init(jax.random.PRNGKey(0))
        for i in range(50):
            state, m = agent.train_step(state, batch, jax.random.PRNGKey(i))
            assert not float(m["train/nonfinite"]), (dtype, i)
            if i == 0:
                first[dtype] = {k: float(v) for k, v in m.items()}
        last[dtype] = {k: float(v) for k, v in m.items()}
    assert all(np.isfinite(v) for v in last["bfloat16"].values())
    for term in ("loss/recon_obs", "loss/cont", "loss/dyn", "loss/reward", "loss/dali"):
        fall32 = first["float32"][term] - last["float32"][term]
        fall16 = first["bfloat16"][term] - last["bfloat16"][term]
        assert fall32 > 0.01 * first["float32"][term], (term, fall32)  # the reference learns
        assert fall16 >= 0.8 * fall32, (term, fall32, fall16)
    for term in ("loss/recon_obs", "loss/reward", "loss/cont", "loss/dyn", "loss/rep",
                 "loss/dali", "loss/critic"):
        a, b = first["float32"][term], first["bfloat16"][term]
        assert abs(a - b) <= 0.02 * abs(a) + 1e-3, (term, a, b)

"""nets.layer_norm: the hand-written LayerNorm + activation gradient equals autodiff's."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.models import nets


def _reference(x, scale, bias, eps, act):
    """LayerNorm + activation written out plainly and differentiated by JAX."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    z = (x - mean) / jnp.sqrt(var + eps) * scale + bias
    return {"none": z, "silu": z * jax.nn.sigmoid(z), "tanh": jnp.tanh(z)}[act]


@pytest.mark.parametrize("act", ["none", "silu", "tanh"])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 4, 8)])
def test_layer_norm_value_and_gradient_match_autodiff(act, shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 3.0 * jax.random.normal(ks[0], shape) + 1.0
    scale = 1.0 + 0.3 * jax.random.normal(ks[1], shape[-1:])
    bias = 0.2 * jax.random.normal(ks[2], shape[-1:])
    w = jax.random.normal(ks[3], shape)  # a non-trivial cotangent

    def loss(fn):
        return lambda x, s, b: jnp.sum(w * jnp.sin(fn(x, s, b)))

    ours = lambda x, s, b: nets.layer_norm(x, s, b, 1e-3, act)
    ref = lambda x, s, b: _reference(x, s, b, 1e-3, act)
    chex.assert_trees_all_close(ours(x, scale, bias), ref(x, scale, bias), atol=1e-5)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, scale, bias)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(x, scale, bias)
    chex.assert_trees_all_close(g_ours, g_ref, atol=2e-5, rtol=2e-5)


def test_layer_norm_keeps_input_dtype_and_dense_params():
    x = jnp.ones((3, 5), jnp.bfloat16) * jnp.arange(5, dtype=jnp.bfloat16)
    out = nets.layer_norm(x, jnp.ones(5), jnp.zeros(5), act="silu")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(_reference(x, 1.0, 0.0, 1e-3, "silu")), atol=2e-2)
    # The fused norm + activation keeps Dense's parameter tree (kernel, norm/scale, norm/bias).
    params = nets.Dense(4).init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "kernel": (3, 4), "norm": {"scale": (4,), "bias": (4,)}}

"""`model.custom_vjp=False`: plain autodiff everywhere, so forward-mode differentiation goes
through the model; its gradients equal those of the custom VJPs."""
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import random_batch


def _loss_fn(agent, batch):
    return lambda mp: agent.world_model_loss(mp, batch, jax.random.PRNGKey(1))[0]


def test_jvp_through_the_world_model_loss(agent_cache):
    """jax.jvp of the DALI-D world-model loss with plain autodiff: along every parameter it
    equals the directional derivative of the custom-VJP reverse mode, <grad, v>; along the
    heads' parameters (which do not move the latent samples, so the loss is smooth there)
    it matches a central finite difference."""
    plain = agent_cache("dali_d", **{"model.custom_vjp": False})
    fast = agent_cache("dali_d")
    mp = plain.model_params(plain.init(jax.random.PRNGKey(0)).params)
    batch = random_batch(plain.spec, T=plain.sequence_length)
    f = jax.jit(_loss_fn(plain, batch))
    leaves, tree = jax.tree_util.tree_flatten(mp)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    v = tree.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    jvp = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,))[1])
    g = jax.jit(jax.grad(_loss_fn(fast, batch)))(mp)
    dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                   jax.tree_util.tree_leaves(v)))
    np.testing.assert_allclose(float(jvp(mp, v)), dot, rtol=1e-4)
    heads = {k: (x if k in ("decoder", "reward", "cont") else
                 jax.tree_util.tree_map(jnp.zeros_like, x)) for k, x in v.items()}
    eps = 1e-3
    shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, mp, heads)
    fd = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    tangent = float(jvp(mp, heads))
    assert abs(tangent) > 1e-2
    np.testing.assert_allclose(tangent, fd, rtol=1e-2)


def test_plain_and_custom_gradients_are_equal(agent_cache):
    """The gradients of the DALI-D world-model loss and of the behaviour objective are the
    same with and without the custom VJPs."""
    fast = agent_cache("dali_d")
    plain = agent_cache("dali_d", **{"model.custom_vjp": False})
    state = fast.init(jax.random.PRNGKey(0))
    batch = random_batch(fast.spec, T=fast.sequence_length)
    mp = fast.model_params(state.params)
    g_fast = jax.jit(jax.grad(_loss_fn(fast, batch)))(mp)
    g_plain = jax.jit(jax.grad(_loss_fn(plain, batch)))(mp)
    for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
    # the actor and critic objective (the critic's routed forward)
    post = jax.jit(fast.world_model_loss)(mp, batch, jax.random.PRNGKey(1))[1][0]
    n = post["deter"].shape[0] * post["deter"].shape[1]
    post = jax.tree_util.tree_map(lambda x: x.reshape((n,) + x.shape[2:]), post)
    ctx = jnp.zeros((n, fast.ctx_dim))
    term = jnp.zeros((n,), bool)

    def beh(agent):
        return jax.jit(jax.grad(lambda p: agent.behavior_objective(
            p, state.slow_critic, state.retnorm, post, ctx, term, jax.random.PRNGKey(2))[0]))
    for a, b in zip(jax.tree_util.tree_leaves(beh(fast)(state.params)),
                    jax.tree_util.tree_leaves(beh(plain)(state.params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)

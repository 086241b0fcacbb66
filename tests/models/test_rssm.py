"""The scan-based observe / imagine equal Python loops over the single-step cell."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.models import rssm as R

B, T, E, A, CC = 3, 7, 10, 2, 4


@pytest.fixture(scope="module")
def cell():
    rssm = R.RSSM(deter=16, units=16, stoch=4, classes=5)
    st = dict(deter=jnp.zeros((B, 16)), logit=jnp.zeros((B, 4, 5)), stoch=jnp.zeros((B, 4, 5)))
    params = rssm.init(jax.random.PRNGKey(0), st, jnp.zeros((B, A)), jnp.zeros((B, E)),
                       jnp.ones((B,), bool), jax.random.PRNGKey(1), jnp.zeros((B, CC)),
                       jnp.zeros((B, CC)))["params"]
    # non-zero learned initial state so resets are visible
    params = dict(params, initial=jnp.linspace(-1, 1, 16))
    return rssm, params


def _data():
    rng = np.random.default_rng(0)
    embed = rng.normal(size=(B, T, E)).astype(np.float32)
    act = rng.uniform(-2, 2, size=(B, T, A)).astype(np.float32)
    first = np.zeros((B, T), bool)
    first[:, 0] = True
    first[1, 4] = True
    ctx = rng.normal(size=(B, T, CC)).astype(np.float32)
    return embed, act, first, ctx


def test_observe_equals_python_loop(cell):
    rssm, params = cell
    embed, act, first, ctx = _data()
    key = jax.random.PRNGKey(5)
    post, prior = R.observe(rssm, params, embed, act, first, key, ctx_post=ctx, ctx_dyn=ctx)
    state = R.initial_state(rssm, params, B)
    keys = jax.random.split(key, T)
    for t in range(T):
        p, q = rssm.apply({"params": params}, state, act[:, t], embed[:, t], first[:, t],
                          keys[t], ctx[:, t], ctx[:, t], method=R.RSSM.obs_step)
        for k in ("deter", "logit", "stoch"):
            np.testing.assert_allclose(post[k][:, t], p[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(prior[k][:, t], q[k], rtol=1e-5, atol=1e-5)
        state = p
    # is_first resets to the learned initial state: the prior deter at a reset does not
    # depend on what came before.
    embed2 = embed.copy()
    embed2[1, :4] += 5.0
    post2, prior2 = R.observe(rssm, params, embed2, act, first, key, ctx_post=ctx, ctx_dyn=ctx)
    np.testing.assert_allclose(prior2["deter"][1, 4], prior["deter"][1, 4], atol=1e-6)
    assert np.abs(np.asarray(prior2["deter"][1, 3] - prior["deter"][1, 3])).max() > 1e-4


def test_observe_gradient_equals_python_loop(cell):
    """observe defers its kernels' gradients to after the scan (custom VJP): the gradient
    of a loss of (post, prior) equals autodiff through a Python loop over obs_step, for the
    parameters and for every differentiable input."""
    rssm, params = cell
    embed, act, first, ctx = _data()
    key = jax.random.PRNGKey(5)
    keys = jax.random.split(key, T)
    w = {k: jax.random.normal(jax.random.PRNGKey(i), s)
         for i, (k, s) in enumerate([("deter", (B, T, 16)), ("logit", (B, T, 4, 5)),
                                     ("stoch", (B, T, 4, 5))])}

    def loss(states):
        post, prior = states
        return sum(jnp.sum(jnp.sin(post[k]) * w[k]) + jnp.sum(prior[k] ** 2 * w[k])
                   for k in w)

    def scanned(params, embed, act, ctx):
        return loss(R.observe(rssm, params, embed, act, first, key, ctx_post=ctx,
                              ctx_dyn=ctx))

    def looped(params, embed, act, ctx):
        state, posts, priors = R.initial_state(rssm, params, B), [], []
        for t in range(T):
            p, q = rssm.apply({"params": params}, state, act[:, t], embed[:, t], first[:, t],
                              keys[t], ctx[:, t], ctx[:, t], method=R.RSSM.obs_step)
            posts.append(p)
            priors.append(q)
            state = p
        stack = lambda xs: jax.tree_util.tree_map(lambda *x: jnp.stack(x, 1), *xs)
        return loss((stack(posts), stack(priors)))

    args = (params, jnp.asarray(embed), jnp.asarray(act), jnp.asarray(ctx))
    v1, g1 = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1, 2, 3)))(*args)
    v2, g2 = jax.jit(jax.value_and_grad(looped, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert all(np.abs(np.asarray(g1[0][k]["kernel"])).max() > 0 for k in R.DEFERRED)


def test_imagine_equals_python_loop(cell):
    rssm, params = cell
    embed, act, first, ctx = _data()
    post, _ = R.observe(rssm, params, embed, act, first, jax.random.PRNGKey(2), ctx_post=ctx,
                        ctx_dyn=ctx)
    start = jax.tree_util.tree_map(lambda x: x[:, -1], post)
    H = 5
    w = jax.random.normal(jax.random.PRNGKey(9), (16 + 20, A))
    policy = lambda s, k: jnp.tanh(R.feat(s) @ w) + 0.1 * jax.random.normal(k, (B, A))
    key = jax.random.PRNGKey(3)
    traj = R.imagine(rssm, params, policy, start, H, key, ctx_dyn=ctx[:, 0])
    assert traj["deter"].shape == (H + 1, B, 16)
    r0, rest = jax.random.split(key)
    state = dict(start, action=policy(start, r0))
    np.testing.assert_allclose(traj["action"][0], state["action"], atol=1e-6)
    for t, k in enumerate(jax.random.split(rest, H)):
        k1, k2 = jax.random.split(k)
        nxt = rssm.apply({"params": params}, state, state["action"], k1, ctx[:, 0],
                         method=R.RSSM.img_step)
        state = dict(nxt, action=policy(nxt, k2))
        for name in ("deter", "stoch", "action"):
            np.testing.assert_allclose(traj[name][t + 1], state[name], rtol=1e-5, atol=1e-5)
    # Per-state outputs run on the imagined states only: zeros in the start state's slot.
    out = R.imagine(rssm, params, policy, start, H, key, ctx_dyn=ctx[:, 0],
                    outputs=lambda s: {"h_sum": s["deter"].sum(-1)})
    assert "h_sum" not in traj
    np.testing.assert_array_equal(out["h_sum"][0], np.zeros(B))
    np.testing.assert_allclose(out["h_sum"][1:], traj["deter"][1:].sum(-1), rtol=1e-5, atol=1e-5)


def test_action_clip_bounds_the_action_input(cell):
    rssm, params = cell
    st = R.initial_state(rssm, params, B)
    key = jax.random.PRNGKey(0)
    a = jnp.array([[3.0, -0.5]] * B)
    c = jnp.zeros((B, CC))
    out_big = rssm.apply({"params": params}, st, a, key, c, method=R.RSSM.img_step)
    out_clip = rssm.apply({"params": params}, st, jnp.clip(a, -1, 1), key, c,
                          method=R.RSSM.img_step)
    np.testing.assert_allclose(out_big["deter"], out_clip["deter"], atol=1e-6)


def test_posterior_is_one_layer_on_the_concatenation(cell):
    """obs_h on h plus obs_e on [embed, c], then LayerNorm + SiLU, is the posterior layer
    act(LN([h, embed, c] W)) with W = [W_h; W_e], written out here in numpy."""
    rssm, params = cell
    embed, act, first, ctx = _data()
    state = R.initial_state(rssm, params, B)
    post, prior = rssm.apply({"params": params}, state, jnp.asarray(act[:, 0]),
                             jnp.asarray(embed[:, 0]), jnp.zeros((B,), bool),
                             jax.random.PRNGKey(2), jnp.asarray(ctx[:, 0]),
                             jnp.asarray(ctx[:, 0]), method=R.RSSM.obs_step)
    p = jax.tree_util.tree_map(np.asarray, params)
    w = np.concatenate([p["obs_h"]["kernel"], p["obs_e"]["kernel"]], 0)
    x = np.concatenate([np.asarray(prior["deter"]), embed[:, 0], ctx[:, 0]], -1) @ w
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-3)
    x = x * p["obs_norm"]["scale"] + p["obs_norm"]["bias"]
    x = x / (1 + np.exp(-x))
    logit = (x @ p["obs_stats"]["kernel"] + p["obs_stats"]["bias"]).reshape(B, 4, 5)
    probs = 0.99 * np.exp(logit) / np.exp(logit).sum(-1, keepdims=True) + 0.01 / 5
    np.testing.assert_allclose(np.exp(np.asarray(post["logit"])), probs, rtol=1e-4, atol=1e-6)


def test_posterior_blocks_initialise_like_the_one_layer():
    """With post_inputs (the [embed, c] width) both blocks get the variance of a fan-avg
    layer on the whole [h, embed, c]: 2 / (deter + post_inputs + units)."""
    deter, units, post = 256, 128, 300
    rssm = R.RSSM(deter=deter, units=units, stoch=4, classes=5, post_inputs=post)
    st = dict(deter=jnp.zeros((1, deter)), logit=jnp.zeros((1, 4, 5)),
              stoch=jnp.zeros((1, 4, 5)))
    p = rssm.init(jax.random.PRNGKey(0), st, jnp.zeros((1, A)), jnp.zeros((1, post - CC)),
                  jnp.ones((1,), bool), jax.random.PRNGKey(1), jnp.zeros((1, CC)))["params"]
    want = np.sqrt(2.0 / (deter + post + units))
    for name in ("obs_h", "obs_e"):
        assert np.asarray(p[name]["kernel"]).std() == pytest.approx(want, rel=0.03), name

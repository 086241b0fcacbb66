"""g_phi windows, the vectorised prefix loss and causality against naive loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.models import alignment as AL
from dali_jax.models import context_encoder as CE

B, T, K, DO, A, H, CD = 2, 9, 4, 3, 2, 16, 5


def _data(seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(B, T, DO)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(B, T, A)).astype(np.float32)
    first = np.zeros((B, T), bool)
    first[:, 0] = True
    first[0, 5] = True
    prev = np.concatenate([np.zeros_like(act[:, :1]), act[:, :-1]], 1) * (~first)[..., None]
    return obs, act, first, CE.tokens(obs, prev)


def _naive_indices(first, k):
    out = np.zeros(first.shape + (k,), int)
    for b in range(first.shape[0]):
        start = 0
        for t in range(first.shape[1]):
            if first[b, t]:
                start = t
            for j in range(k):
                out[b, t, j] = max(t - (k - 1) + j, start)
    return out


def test_window_indices_are_causal_episode_bounded_and_edge_padded():
    _, _, first, _ = _data()
    idx = np.asarray(CE.window_indices(jnp.asarray(first), K))
    np.testing.assert_array_equal(idx, _naive_indices(first, K))
    assert (idx <= np.arange(T)[None, :, None]).all()
    np.testing.assert_array_equal(idx[0, 6], [5, 5, 5, 6])  # new episode at 5


@pytest.mark.parametrize("kind,readout,k,grads,hist", [
    ("transformer", "flatten", K, True, 0), ("transformer", "mean", K, False, 0),
    ("transformer", "flatten", T, False, 0), ("transformer", "mean", T + 3, True, 0),
    ("attention", "flatten", K, False, 0), ("attention", "mean", T, True, 0),
    ("gru", "flatten", K, False, 0), ("mlp", "flatten", K, False, 0),
    ("transformer", "flatten", K, True, K - 1), ("attention", "flatten", K, False, K)])
def test_chunk_path_equals_explicit_windows(kind, readout, k, grads, hist):
    """The chunk path (per-pair attention for transformer / attention) gives the values and
    the parameter gradients of g_phi applied to each explicitly gathered window; windows
    shorter than, equal to and longer than the chunk, with an episode start inside it, and
    the windows of the last T - hist steps only (the first hist steps are history that fills
    them: hist >= k - 1 gives every window its k steps, the training batches' case)."""
    obs, act, first, tok = _data()
    enc = CE.ContextEncoder(kind, H, CD, k, readout)
    params = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, k, DO + A)))["params"]
    idx = CE.window_indices(jnp.asarray(first), k)[:, hist:]
    chunk = lambda p: enc.apply({"params": p}, tok, idx, method=CE.ContextEncoder.chunk)
    got = chunk(params)
    S = T - hist
    assert got.shape == (B, S, CD)
    nidx = _naive_indices(first, k)[:, hist:]
    windows = jnp.asarray(np.asarray(tok)[np.arange(B)[:, None, None], nidx].reshape(B * S, k, -1))
    direct = lambda p: enc.apply({"params": p}, windows).reshape(B, S, CD)
    np.testing.assert_allclose(got, direct(params), rtol=2e-5, atol=2e-5)
    if not grads:  # parameter gradients: checked on one case per readout and kind
        return
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, CD)), jnp.float32)
    g_chunk = jax.grad(lambda p: (chunk(p) * weights).sum())(params)
    g_direct = jax.grad(lambda p: (direct(p) * weights).sum())(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           g_chunk, g_direct)


def test_full_chunk_windows_pairs_equal_gather():
    """Non-causal (release) windows: every position sees the whole chunk."""
    _, _, _, tok = _data()
    enc = CE.ContextEncoder("transformer", H, CD, T, "flatten")
    params = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, T, DO + A)))["params"]
    idx = CE.full_chunk_indices(B, T)
    got = enc.apply({"params": params}, tok, idx, False, method=CE.ContextEncoder.chunk)
    want = enc.apply({"params": params}, jnp.broadcast_to(tok[:, None], (B, T, T, DO + A))
                     .reshape(B * T, T, -1)).reshape(B, T, CD)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("residual,standardize", [(False, False), (True, True)])
def test_alignment_loss_equals_naive_loop(residual, standardize):
    """Every loss option against a Python loop over windows and their transitions inside
    the window (the paper's): plain, residual and standardised forward targets; inverse
    and both."""
    obs, act, first, tok = _data(1)
    enc = CE.ContextEncoder("transformer", H, CD, K)
    fwd = AL.DynamicsHead(DO, 2, 8)
    inv = AL.DynamicsHead(A, 2, 8)
    pe = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, K, DO + A)))["params"]
    pf = fwd.init(jax.random.PRNGKey(1), jnp.zeros((1, DO + A + CD)))["params"]
    pi = inv.init(jax.random.PRNGKey(2), jnp.zeros((1, 2 * DO + CD)))["params"]
    f = lambda x: fwd.apply({"params": pf}, x)
    g = lambda x: inv.apply({"params": pi}, x)
    idx = CE.window_indices(jnp.asarray(first), K)
    ctx = enc.apply({"params": pe}, tok, idx, method=CE.ContextEncoder.chunk)
    trans = AL.transition_indices(idx)
    norm = (np.array([0.5, -1.0, 0.0], np.float32), np.array([2.0, 0.5, 1.0], np.float32))
    for mode in ("forward", "inverse", "both"):
        got = np.asarray(AL.alignment_loss(f, g, obs, act, trans, ctx, mode, residual,
                                          norm if standardize else None))
        want = np.zeros((B, T))
        for b in range(B):
            start = 0
            for t in range(T):
                start = t if first[b, t] else start
                steps = list(range(max(t - K + 1, start), t + 1))  # the real steps of window t
                window = [steps[0]] * (K - len(steps)) + steps
                c = enc.apply({"params": pe}, jnp.asarray(np.asarray(tok)[b, window][None]))[0]
                errs = []
                for j in steps[:-1]:
                    e = 0.0
                    if mode in ("forward", "both"):
                        pred = f(jnp.concatenate([obs[b, j], act[b, j], c]))
                        y = obs[b, j + 1] - (obs[b, j] if residual else 0.0)
                        if standardize:
                            y = (y - norm[0]) / norm[1]
                        e += float(jnp.mean((pred - y) ** 2))
                    if mode in ("inverse", "both"):
                        pred = g(jnp.concatenate([obs[b, j], obs[b, j + 1], c]))
                        e += float(jnp.mean((pred - act[b, j]) ** 2))
                    errs.append(e)
                want[b, t] = np.mean(errs) if errs else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got[0, 5] == 0.0 and got[0, 6] > 0  # episode start: no pair yet


@pytest.mark.parametrize("residual,standardize,layers,units", [
    (False, False, 2, 8), (True, True, 2, 8), (True, True, 1, 8), (False, False, 3, 8),
    (True, True, 2, 2), (False, False, 1, 2)])
def test_per_step_alignment_loss_equals_the_plain_formula(residual, standardize, layers,
                                                          units):
    """alignment_loss_per_step (fastgrad.pair_mse) against alignment_loss: values and the
    gradients with respect to the heads' params, the contexts and the observations, for
    forward, inverse and both; the targets are offset by 30 so that |y|^2 dwarfs the error
    (the rewrite's expanded square must not lose it). units 2 < DO: f_psi's error takes the
    expanded form; 8: every head computes its output per pair."""
    obs, act, first, tok = _data(4)
    obs = jnp.asarray(obs) + 30.0
    fwd, inv = AL.DynamicsHead(DO, layers, units), AL.DynamicsHead(A, layers, units)
    pf = fwd.init(jax.random.PRNGKey(1), jnp.zeros((1, DO + A + CD)))["params"]
    pi = inv.init(jax.random.PRNGKey(2), jnp.zeros((1, 2 * DO + CD)))["params"]
    rng = np.random.default_rng(7)  # non-zero biases: every term of the rewrite matters
    pf, pi = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32), (pf, pi))
    idx = CE.window_indices(jnp.asarray(first), K)
    ctx = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, CD)), jnp.float32)
    trans = AL.transition_indices(idx)
    norm = ((jnp.array([30.5, 29.0, 30.0]), jnp.array([2.0, 0.5, 1.0])) if standardize
            else None)
    weights = jnp.asarray(np.random.default_rng(6).uniform(size=(B, T)), jnp.float32)
    for mode in ("forward", "inverse", "both"):
        def plain(pf, pi, ctx, obs):
            f = lambda x: fwd.apply({"params": pf}, x)
            g = lambda x: inv.apply({"params": pi}, x)
            return AL.alignment_loss(f, g, obs, act, trans, ctx, mode, residual, norm)

        def per_step(pf, pi, ctx, obs):
            return AL.alignment_loss_per_step(pf, pi, obs, act, trans, ctx, mode, residual,
                                             norm)

        want, got = plain(pf, pi, ctx, obs), per_step(pf, pi, ctx, obs)
        assert float(want.max()) > 0
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
        grads = [jax.grad(lambda *a: (fn(*a) * weights).sum(), argnums=(0, 1, 2, 3))(
            pf, pi, ctx, obs) for fn in (plain, per_step)]
        for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
            np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-4)

    # loss=both weighs the inverse term by inverse_weight, in both implementations
    f = lambda x: fwd.apply({"params": pf}, x)
    g = lambda x: inv.apply({"params": pi}, x)
    parts = {m: AL.alignment_loss(f, g, obs, act, trans, ctx, m, residual, norm)
             for m in ("forward", "inverse")}
    want = parts["forward"] + 7.0 * parts["inverse"]
    np.testing.assert_allclose(AL.alignment_loss(f, g, obs, act, trans, ctx, "both", residual,
                                                norm, inverse_weight=7.0), want, rtol=1e-5)
    np.testing.assert_allclose(AL.alignment_loss_per_step(pf, pi, obs, act, trans, ctx, "both",
                                                         residual, norm, inverse_weight=7.0),
                               want, rtol=2e-4, atol=1e-5)


def test_target_moments_are_masked_at_episode_starts():
    obs, _, first, _ = _data(3)
    for residual in (False, True):
        mean, var = AL.target_moments(jnp.asarray(obs), jnp.asarray(first), residual)
        ys = [obs[b, t] - (obs[b, t - 1] if residual else 0.0)
              for b in range(B) for t in range(1, T) if not first[b, t]]
        np.testing.assert_allclose(mean, np.mean(ys, 0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, np.var(ys, 0), rtol=1e-4, atol=1e-6)


def test_context_is_causal():
    obs, act, first, tok = _data(2)
    enc = CE.ContextEncoder("transformer", H, CD, K)
    pe = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, K, DO + A)))["params"]
    idx = CE.window_indices(jnp.asarray(first), K)
    c1 = np.asarray(enc.apply({"params": pe}, tok, idx, method=CE.ContextEncoder.chunk))
    t = 3
    tok2 = np.asarray(tok).copy()
    tok2[:, t + 1:] += 10.0
    c2 = np.asarray(enc.apply({"params": pe}, jnp.asarray(tok2), idx,
                              method=CE.ContextEncoder.chunk))
    np.testing.assert_array_equal(c1[:, :t + 1], c2[:, :t + 1])
    assert np.abs(c1[:, t + 1:] - c2[:, t + 1:]).max() > 1e-3
    # The release's full-chunk window is not causal.
    full = CE.full_chunk_indices(B, T)
    enc_full = CE.ContextEncoder("transformer", H, CD, T)
    pf = enc_full.init(jax.random.PRNGKey(0), jnp.zeros((1, T, DO + A)))["params"]
    d1 = enc_full.apply({"params": pf}, tok, full, False, method=CE.ContextEncoder.chunk)
    d2 = enc_full.apply({"params": pf}, jnp.asarray(tok2), full, False,
                        method=CE.ContextEncoder.chunk)
    assert np.abs(np.asarray(d1[:, 0] - d2[:, 0])).max() > 1e-4


def test_crossmodal_loss_gradients():
    cm = AL.CrossModal(state_dim=6, ctx_dim=3)
    p = cm.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), jnp.zeros((1, 6)))["params"]
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 3))
    s = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 6))
    fn = lambda pp, c, s, fit: AL.crossmodal_loss(lambda a, b: cm.apply({"params": pp}, a, b),
                                                  c, s, fit).mean()
    g_s = jax.grad(fn, argnums=2)(p, c, s, True)
    assert np.abs(np.asarray(g_s)).max() > 0  # pulls the state towards the context
    g_p = jax.grad(fn)(p, c, s, False)
    # without fitting, the c -> s map gets no gradient (the release's behaviour)
    assert np.abs(np.asarray(g_p["to_state"]["kernel"])).max() == 0
    assert np.abs(np.asarray(g_p["to_ctx"]["kernel"])).max() > 0
    g_p = jax.grad(fn)(p, c, s, True)
    assert np.abs(np.asarray(g_p["to_state"]["kernel"])).max() > 0
    # fitting the map does not pull c towards the state: c's gradient comes only from
    # ||c_hat(sg(s)) - c||^2, with or without the fit, and equals its hand formula
    g_c_fit = jax.grad(fn, argnums=1)(p, c, s, True)
    g_c = jax.grad(fn, argnums=1)(p, c, s, False)
    np.testing.assert_allclose(g_c_fit, g_c, rtol=1e-6, atol=1e-7)
    _, c_hat = cm.apply({"params": p}, c, s)
    np.testing.assert_allclose(g_c, -2 * (c_hat - c) / c.size, rtol=1e-5, atol=1e-7)


def test_mean_readout_sees_the_order_of_the_window():
    """With the mean readout, learned positional embeddings make the context depend on the
    order of the tokens (without them a window would be an unordered bag)."""
    _, _, _, tok = _data(4)
    for kind in ("transformer", "attention"):
        enc = CE.ContextEncoder(kind, H, CD, K, "mean")
        params = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, K, DO + A)))["params"]
        assert params["pos"].shape == (K, H)
        params = dict(params, pos=jax.random.normal(jax.random.PRNGKey(1), (K, H)))
        w = jnp.asarray(tok)[:, :K]
        c, c_rev = (enc.apply({"params": params}, x) for x in (w, w[:, ::-1]))
        assert np.abs(np.asarray(c - c_rev)).max() > 1e-3
        no_pos = dict(params, pos=jnp.zeros((K, H)))
        c0, c0_rev = (enc.apply({"params": no_pos}, x) for x in (w, w[:, ::-1]))
        np.testing.assert_allclose(c0, c0_rev, rtol=1e-5, atol=1e-6)

"""Agent-level checks: parameter counts, gradient isolation, determinism, context blindness."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_batch
from dali_jax import config as config_lib
from dali_jax.agent import imagination
from dali_jax.agent import Agent, Spec, count_params, trained_param_count

WALKER = Spec(obs={"obs": ((24,), np.float32), "context": ((2,), np.float32)}, action_dim=6)


WALKER_PIXELS = Spec(obs={"image": ((64, 64, 3), np.uint8), "context": ((2,), np.float32)},
                     action_dim=6)


def _walker_params(method, obs="features", **ctx):
    c = config_lib.get_config()
    c.task, c.method, c.obs = "walker", method, obs
    c.context.alignment = "custom"
    for k, v in ctx.items():
        c.context[k] = v
    agent = Agent(c, WALKER if obs == "features" else WALKER_PIXELS)
    return jax.eval_shape(agent.init, jax.random.PRNGKey(0)).params


def test_release_small_parameter_count_walker():
    """Release small config (5 x 1024 enc/dec MLPs), featurized Walker: 18,708,003."""
    assert trained_param_count(_walker_params("dreamer_dr")) == 18_708_003


def test_release_small_parameter_count_walker_pixels():
    """Release small config, Walker from 64x64x3 images (action size 6): 17,926,030.

    Four stride-2 convs 32-256 with channel LayerNorm and no bias; the decoder's input
    Linear (with bias) to 4x4x256 and three transposed convs with LayerNorm, the last one
    plain with a bias; the posterior reads [h, 4096-d embedding]."""
    p = _walker_params("dreamer_dr", obs="pixels")
    assert trained_param_count(p) == 17_926_030
    assert count_params(p["encoder"]) == 690_624
    assert count_params(p["decoder"]) == 6_985_667


def test_dali_d_pixel_parameter_overhead():
    """The release's pixel DALI-D: c (8-d) enters img_step, decoder, reward, continue, actor
    and critic (+5 x 8 x 512 + 8 x 4096); g_phi reads [embedding, action] tokens. The spec
    gives +15% for the whole model."""
    p = _walker_params("dali_d", obs="pixels", release_compat=True, window=64, loss="forward")
    assert trained_param_count(p) == 17_926_030 + 5 * 8 * 512 + 8 * 4096
    overhead = count_params(p) / 17_926_030 - 1
    assert 0.145 <= overhead <= 0.155, overhead


def test_dali_d_parameter_overhead():
    base = 18_708_003
    rel = _walker_params("dali_d", release_compat=True, loss="forward")  # the release's loss
    assert trained_param_count(rel) == 18_736_675  # the release's DALI-D total
    assert count_params(rel["context"]) == 586_296  # g_phi + f_psi + chi heads
    ours = _walker_params("dali_d", loss="forward")
    overhead = (count_params(ours) - base) / base
    assert 0.03 <= overhead <= 0.04, overhead
    # the intended deep variant also feeds c to the posterior: + 8 * 512
    assert trained_param_count(ours) == 18_736_675 + 8 * 512
    # the project's recipe (both) adds the inverse head [o_j, o_j+1, c] (56) -> 128 -> 128
    # -> a_j (6), biased, to f_psi [o_j, a_j, c] (38) -> 128 -> 128 -> o_j+1 (24); inverse
    # alone has the inverse head instead of f_psi
    inverse_head = 56 * 128 + 128 + 128 * 128 + 128 + 128 * 6 + 6
    f_psi = 38 * 128 + 128 + 128 * 128 + 128 + 128 * 24 + 24
    assert count_params(_walker_params("dali_d")) == count_params(ours)  # the paper's
    assert count_params(_walker_params("dali_d", loss="both")) == (
        count_params(ours) + inverse_head)
    assert count_params(_walker_params("dali_d", loss="inverse")) == (
        count_params(ours) - f_psi + inverse_head)


def _nonzero(tree):
    return {k: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(v)))
            for k, v in tree.items()}


def test_gradient_isolation(agent_cache):
    agent = agent_cache("dali_d", **{"context.alignment": "project"})
    state = agent.init(jax.random.PRNGKey(0))
    p = state.params
    batch = random_batch(agent.spec)
    mp = agent.model_params(p)
    # KL balancing: dyn trains the prior only, rep the posterior only (on the logits; over
    # time the posterior sample also feeds later priors, so use a single step for params).
    from dali_jax.models import rssm as R
    lp, lq = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 4, 4))
    g = jax.grad(lambda a, b: R.kl_losses({"logit": a}, {"logit": b}, 0.0)[0].sum(), (0, 1))(lp, lq)
    assert float(jnp.abs(g[0]).sum()) == 0 and float(jnp.abs(g[1]).sum()) > 0
    g = jax.grad(lambda a, b: R.kl_losses({"logit": a}, {"logit": b}, 0.0)[1].sum(), (0, 1))(lp, lq)
    assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) == 0
    one = {k: v[:, :1] for k, v in batch.items()}

    @jax.jit
    def wm_grads(m):  # one compiled program for the four world-model gradients
        def grad(b, name):
            return jax.grad(lambda m: agent.world_model_loss(m, b, jax.random.PRNGKey(1))[1][2][
                name])(m)
        return dict(dyn=grad(one, "loss/dyn")["rssm"], rep=grad(one, "loss/rep")["rssm"],
                    rec=grad(batch, "loss/recon_obs"), ali=grad(batch, "loss/dali"))

    absum = lambda t: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(t)))
    g = wm_grads(mp)
    g_dyn, g_rep, g_rec, g_ali = g["dyn"], g["rep"], g["rec"], g["ali"]
    assert absum(g_dyn["obs_stats"]) == 0 and absum(g_dyn["obs_h"]) == 0
    assert absum(g_dyn["obs_e"]) == 0 and absum(g_dyn["obs_norm"]) == 0
    assert absum(g_dyn["img_stats"]) > 0
    assert absum(g_rep["img_stats"]) == 0 and absum(g_rep["obs_stats"]) > 0
    # The world-model losses see c as stop-gradient; only the alignment loss trains g_phi.
    assert absum(g_rec["context"]) == 0 and absum(g_rec["encoder"]) > 0
    assert absum(g_ali["context"]["encoder"]) > 0 and absum(g_ali["context"]["inverse"]) > 0
    assert absum({k: g_ali[k] for k in ("rssm", "decoder", "reward", "cont")}) == 0
    # Actor loss: only the actor; critic loss: only the critic.
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    (_, (post, ctx, _, _)) = jax.jit(agent.world_model_loss)(mp, batch, jax.random.PRNGKey(1))
    start = jax.tree_util.tree_map(flat, post)
    # Give the zero-initialised reward and critic heads some weights so gradients can flow.
    p = jax.tree_util.tree_map(lambda x: x + 0.01, p)
    (a_loss, aux), g_act = jax.jit(jax.value_and_grad(agent.actor_objective, has_aux=True))(
        p, state.retnorm, start, flat(ctx), flat(jnp.asarray(batch["is_terminal"])),
        jax.random.PRNGKey(2))
    sums = _nonzero(g_act)
    assert sums["actor"] > 0
    assert all(v == 0 for k, v in sums.items() if k != "actor"), sums
    g_crit = jax.jit(jax.grad(agent.critic_objective))(p, state.slow_critic, aux["traj"],
                                                       aux["ret"])
    sums = _nonzero(g_crit)
    assert sums["critic"] > 0
    assert all(v == 0 for k, v in sums.items() if k != "critic"), sums
    # The fused objective of train_step (one critic forward for both losses) has exactly
    # the gradient of the two separate objectives, and the same loss values.
    args = (start, flat(ctx), flat(jnp.asarray(batch["is_terminal"])), jax.random.PRNGKey(2))
    g_both, aux_b = jax.jit(jax.grad(agent.behavior_objective, has_aux=True))(
        p, state.slow_critic, state.retnorm, *args)
    for k in g_both:
        want = g_act[k] if k == "actor" else g_crit[k]
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                       atol=1e-7),
                               g_both[k], want)
    np.testing.assert_allclose(aux_b["loss/actor"], a_loss, rtol=1e-4)
    np.testing.assert_allclose(aux_b["loss/critic"], agent.critic_objective(
        p, state.slow_critic, aux["traj"], aux["ret"]), rtol=1e-4)


def _run(agent, steps=2, seed=0, batch=None):
    state = agent.init(jax.random.PRNGKey(seed))
    batch = random_batch(agent.spec) if batch is None else batch
    metrics = None
    for i in range(steps):
        state, metrics = agent.train_step(state, batch, jax.random.PRNGKey(100 + i))
    return state, jax.device_get(metrics)


def test_same_seed_identical_outputs(agent_cache):
    agent = agent_cache("dali_d")
    s1, m1 = _run(agent)
    s2, m2 = _run(agent)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert m1 == m2
    s3, m3 = _run(agent, seed=1)
    assert m3 != m1


def _changed(before, after):
    return [bool(np.any(np.asarray(a) != np.asarray(b))) for a, b in
            zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after))]


@pytest.mark.parametrize("compat", [False, True])
def test_context_parameters_are_trained(agent_cache, compat):
    method = "dali_s_chi"
    over = ({"context.release_compat": True, "context.window": 16} if compat
            else {"context.alignment": "project"})
    agent = agent_cache(method, **over)
    init = agent.init(jax.random.PRNGKey(0))
    before = jax.device_get(init.params["context"])
    state, _ = _run(agent, steps=3)
    after = jax.device_get(state.params["context"])
    changed = _changed(before, after)
    if compat:
        assert not any(changed)  # the release never updates g_phi, f_psi or chi
    else:
        assert all(changed), [jax.tree_util.keystr(k) for (k, _), c in zip(
            jax.tree_util.tree_leaves_with_path(before), changed) if not c]
        assert set(after) >= {"encoder", "forward", "inverse", "cross"}  # the project's: both


def _policy_actions(agent, params, batch):
    carry = agent.initial_carry(params, 3)
    acts = []
    for t in range(6):
        obs = {k: batch[k][:3, t] for k in agent.spec.obs}
        obs["is_first"] = batch["is_first"][:3, t] | (t == 0)
        a, carry = agent.policy_step(params, carry, obs, jax.random.PRNGKey(t))
        acts.append(np.asarray(a))
    return np.stack(acts)


@pytest.mark.parametrize("method,blind", [("dali_d", True), ("dali_s", True),
                                          ("dali_s_chi", True), ("dreamer_dr", True),
                                          ("crssm_s", False), ("crssm_d", False)])
def test_context_blindness(agent_cache, method, blind):
    agent = agent_cache(method)
    b1 = random_batch(agent.spec)
    b2 = dict(b1, context=np.random.default_rng(7).uniform(-1, 1, b1["context"].shape)
              .astype(np.float32))
    s1, m1 = _run(agent, batch=b1)
    s2, m2 = _run(agent, batch=b2)
    a1 = _policy_actions(agent, s1.params, b1)
    a2 = _policy_actions(agent, s1.params, b2)
    if blind:
        assert m1 == m2
        np.testing.assert_array_equal(a1, a2)
        for x, y in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
        assert m1 != m2
        assert np.abs(a1 - a2).max() > 0


def test_policy_context_window_resets_and_pairs(agent_cache):
    """Acting builds the same tokens as training: [o_t, a_{t-1}], reset at episode start."""
    from dali_jax.models import context_encoder as CE
    agent = agent_cache("dali_d")
    params = agent.init(jax.random.PRNGKey(0)).params
    batch = random_batch(agent.spec, B=2, T=12, seed=3)
    first = batch["is_first"].copy()
    first[:, 0] = True
    carry = agent.initial_carry(params, 2)
    acts = []
    for t in range(12):
        obs = {k: batch[k][:, t] for k in agent.spec.obs}
        obs["is_first"] = first[:, t]
        a, carry = agent.policy_step(params, carry, obs, jax.random.PRNGKey(t))
        acts.append(np.asarray(a))
    acts = np.stack(acts, 1)  # (2, 12, A)
    # Rebuild the acting windows from the training-side index computation.
    prev = np.asarray(agent.prev_actions(jnp.asarray(acts), jnp.asarray(first)))
    tok = np.asarray(CE.tokens(batch["obs"], prev))
    idx = np.asarray(CE.window_indices(jnp.asarray(first), agent.config.context.window))
    np.testing.assert_allclose(np.asarray(carry["window"]), tok[np.arange(2)[:, None], idx[:, -1]],
                               atol=1e-6)


def test_pixel_dali_d_update_and_acting():
    """Pixel runs: CNN encoder/decoder, tokens from the (stop-gradient) embedding; decoding
    and the open-loop video report (agent/imagination.py)."""
    from tests.helpers import tiny_config
    spec = Spec(obs={"image": ((64, 64, 3), np.uint8), "context": ((2,), np.float32)},
                action_dim=2)
    agent = Agent(tiny_config("dali_d"), spec)
    assert agent.token_obs_dim == 4 * 4 * 8 * agent.sizes["cnn_depth"]
    batch = random_batch(spec, seed=4)
    state = agent.init(jax.random.PRNGKey(0))
    recon = []
    for i in range(4):
        state, m = agent.train_step(state, batch, jax.random.PRNGKey(i))
        recon.append(float(m["loss/recon_image"]))
    assert all(np.isfinite(v) for v in jax.device_get(m).values())
    assert recon[-1] < recon[0]
    carry = agent.initial_carry(state.params, 2)
    obs = {"image": batch["image"][:2, 0], "context": batch["context"][:2, 0],
           "is_first": np.ones(2, bool)}
    a, carry = agent.policy_step(state.params, carry, obs, jax.random.PRNGKey(0))
    assert a.shape == (2, 2) and carry["window"].shape == (2, 8, agent.token_obs_dim + 2)
    dec = imagination.decode(agent, state.params, carry["state"], carry["ctx_prev"])
    assert dec["image"].shape == (2, 64, 64, 3)
    assert float(dec["image"].min()) >= 0 and float(dec["image"].max()) <= 1
    # The trainer's open-loop video: true | model | error frames side by side.
    sub = {k: v[:2] for k, v in batch.items()}
    video = jax.jit(functools.partial(imagination.openloop_report, agent))(
        state.params, sub, jax.random.PRNGKey(1))["image"]
    T = sub["image"].shape[1]
    assert video.shape == (2, T, 64, 3 * 64, 3) and video.dtype == np.uint8
    true, model, err = (np.asarray(video[..., i * 64:(i + 1) * 64, :], np.float32)
                        for i in range(3))
    np.testing.assert_allclose(true, sub["image"], atol=1)
    np.testing.assert_allclose(err, (model - true) / 2 + 127.5, atol=2)
    # The logged strip: sequence b's frame 4j at rows b*64.., columns j*192..
    strip = np.asarray(jax.jit(functools.partial(imagination.openloop_strips, agent))(
        state.params, sub, jax.random.PRNGKey(1))["image"])
    assert strip.shape == (2 * 64, len(range(0, T, 4)) * 3 * 64, 3)
    for b in range(2):
        for j, t in enumerate(range(0, T, 4)):
            np.testing.assert_array_equal(strip[b * 64:(b + 1) * 64, j * 192:(j + 1) * 192],
                                          video[b, t])


def test_context_drop_ablation_removes_exactly_that_input():
    """context.drop turns one recipe switch off: "dynamics" removes c from img_step only
    (8 x 512 fewer weights in its input layer, heads unchanged), "heads" removes it from the
    decoder (1024 units), reward, continue, actor and critic (512 units) and leaves img_step."""
    full = _walker_params("dali_d")
    no_dyn = _walker_params("dali_d", drop="dynamics")
    no_heads = _walker_params("dali_d", drop="heads")
    cd, units = 8, 512
    assert count_params(full["rssm"]) - count_params(no_dyn["rssm"]) == cd * units
    for k in ("decoder", "reward", "cont", "actor", "critic"):
        assert count_params(no_dyn[k]) == count_params(full[k])
    assert count_params(full) - count_params(no_heads) == cd * 1024 + 4 * cd * units
    assert count_params(no_heads["rssm"]) == count_params(full["rssm"])
    # dali_d minus dynamics and heads has dali_s's parameters.
    assert count_params(_walker_params("dali_d", drop="dynamics, heads")) == \
        count_params(_walker_params("dali_s"))


@pytest.mark.parametrize("method,drop,match", [
    ("dali_d", "prior", "not one of posterior, dynamics, heads"),
    ("dreamer_dr", "heads", "has no context"),
    ("dali_s", "posterior", "without any use"),
])
def test_context_drop_rejects_bad_values(method, drop, match):
    c = config_lib.get_config()
    c.method, c.context.drop = method, drop
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)

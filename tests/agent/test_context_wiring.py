"""Where the context goes and in which precision: g_phi and its heads in float32 under a
bfloat16 world model, the executed action in the acting carry, the chi term of DALI-D
(`context.chi_deep`), and pixel runs blind to the true context."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import feature_spec, random_batch, tiny_config
from dali_jax.agent import Agent, Spec


def _dots(jaxpr):
    """Every dot_general / conv equation of a closed jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(eqn)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else (v,)):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += _dots(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    out += _dots(sub)
    return out


def _operand_dtypes(fn, *args):
    return {str(v.aval.dtype) for e in _dots(jax.make_jaxpr(fn)(*args).jaxpr)
            for v in e.invars}


def test_context_networks_compute_in_float32_under_a_bfloat16_world_model():
    """compute_dtype=bfloat16: the world model's matmuls take bfloat16 operands, while every
    matmul of g_phi (acting and training paths), f_psi, the inverse head and the alignment
    loss takes float32 ones."""
    agent = Agent(tiny_config("dali_d", compute_dtype="bfloat16",
                              **{"context.alignment": "project"}), feature_spec())
    state = agent.init(jax.random.PRNGKey(0))
    mp = agent.model_params(state.params)
    batch = {k: jnp.asarray(v) for k, v in
             random_batch(agent.spec, T=agent.sequence_length).items()}
    embed = lambda p: agent.encoder.apply({"params": p["encoder"]},
                                          {k: batch[k] for k in agent.spec.obs})
    assert _operand_dtypes(embed, mp) == {"bfloat16"}  # the world model is bfloat16
    steps = agent.config.train.batch_length

    def context_terms(p):
        ctx, aux = agent.context_chunk(p, batch, embed(p), steps)
        return agent.context_losses(p["context"], aux, ctx, state.align_stats)[0]

    def context_only(p):  # the context path with the (bfloat16) encoder's matmuls excluded
        return context_terms(dict(p, encoder=jax.lax.stop_gradient(p["encoder"])))

    enc_dots = len(_dots(jax.make_jaxpr(embed)(mp).jaxpr))
    ctx_jaxpr = jax.make_jaxpr(context_only)(mp).jaxpr
    ctx_dots = _dots(ctx_jaxpr)
    assert len(ctx_dots) > enc_dots  # g_phi and the heads are in it
    dtypes = [str(v.aval.dtype) for e in ctx_dots for v in e.invars]
    assert dtypes.count("bfloat16") <= 2 * enc_dots  # only the encoder's own matmuls
    grads = jax.make_jaxpr(jax.grad(lambda p: context_only(p)["dali"].mean()))(mp).jaxpr
    enc_free = [str(v.aval.dtype) for e in _dots(grads) for v in e.invars]
    assert enc_free.count("bfloat16") <= 2 * enc_dots
    # acting: g_phi on a window of tokens
    window = jnp.zeros((3, agent.config.context.window,
                        agent.token_obs_dim + agent.spec.action_dim), jnp.float32)
    assert _operand_dtypes(lambda p: agent.infer_context(p, window), state.params) == {
        "float32"}
    fwd_in = jnp.zeros((5, agent.token_obs_dim + agent.spec.action_dim + agent.ctx_dim))
    assert _operand_dtypes(lambda p: agent.forward_head.apply({"params": p}, fwd_in),
                           mp["context"]["forward"]) == {"float32"}
    inv_in = jnp.zeros((5, 2 * agent.token_obs_dim + agent.ctx_dim))
    assert _operand_dtypes(lambda p: agent.inverse_head.apply({"params": p}, inv_in),
                           mp["context"]["inverse"]) == {"float32"}


def test_acting_carry_holds_the_clipped_policy_action(agent_cache):
    """The policy's Normal samples exceed the action bounds; the returned action is clipped
    and the carry's prev_action (next step's token and RSSM input) is that action."""
    agent = agent_cache("dali_d")
    params = agent.init(jax.random.PRNGKey(0)).params
    n = 64
    batch = random_batch(agent.spec, B=n, T=2)
    carry = agent.initial_carry(params, n)
    obs = {k: batch[k][:, 0] for k in agent.spec.obs}
    obs["is_first"] = np.ones(n, bool)
    raw = agent.policy_dist(params["actor"], jnp.zeros((n, agent.state_dim + agent.ctx_dim)))
    assert np.abs(np.asarray(raw.sample(jax.random.PRNGKey(3)))).max() > 1.0
    action, carry = agent.policy_step(params, carry, obs, jax.random.PRNGKey(1))
    action = np.asarray(action)
    assert np.abs(action).max() <= 1.0 and np.isclose(np.abs(action).max(), 1.0)
    np.testing.assert_array_equal(np.asarray(carry["prev_action"]), action)


def test_trainer_carry_continues_from_the_executed_prefill_action(tmp_path):
    """During the prefill the env executes a held random action, not the policy's: the
    trainer's acting carry records that action."""
    from dali_jax import presets
    from dali_jax.config import get_config
    from dali_jax.training.setup import prefill_action
    from dali_jax.training.train import Trainer
    c = presets.apply(get_config(), "smoke")
    c.method, c.context_setting, c.logdir = "dali_d", "single_0", str(tmp_path / "run")
    c.run.prefill_hold = 3
    trainer = Trainer(c)
    trainer.restore_or_init()
    obs = trainer.venv.reset()
    carry = trainer.agent.initial_carry(trainer.state.params, trainer.venv.num_envs)
    action, carry, _ = trainer._act(carry, obs, [])
    want = prefill_action(c.seed, 0, 3, trainer.action_low, trainer.action_high, action.shape)
    np.testing.assert_array_equal(action, want)
    np.testing.assert_array_equal(np.asarray(carry["prev_action"]), want)
    trainer.venv.close()


@pytest.mark.parametrize("chi_deep", [False, True])
def test_chi_deep_adds_the_cross_modal_term_to_dali_d(agent_cache, chi_deep):
    """context.chi_deep: DALI-D's world-model loss has the chi term and its cross-modal
    heads get gradients; without it neither."""
    agent = agent_cache("dali_d", **{"context.chi_deep": chi_deep})
    state = agent.init(jax.random.PRNGKey(0))
    mp = agent.model_params(state.params)
    batch = random_batch(agent.spec, T=agent.sequence_length)
    grads, (_, _, metrics, _) = jax.grad(agent.world_model_loss, has_aux=True)(
        mp, batch, jax.random.PRNGKey(1))
    assert ("loss/chi" in metrics) == chi_deep
    cross = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(
        grads["context"]["cross"]))
    assert (cross > 0) == chi_deep


@pytest.mark.parametrize("method", ["dali_s", "dali_d"])
def test_pixel_dali_is_blind_to_the_true_context(method):
    """Pixel runs: changing the env's true context changes neither the world-model loss, its
    gradients nor the actions of a DALI method."""
    spec = Spec(obs={"image": ((64, 64, 3), np.uint8), "context": ((2,), np.float32)},
                action_dim=2)
    agent = Agent(tiny_config(method, obs="pixels"), spec)
    state = agent.init(jax.random.PRNGKey(0))
    mp = agent.model_params(state.params)
    b1 = random_batch(spec, B=2, T=agent.sequence_length)
    b2 = dict(b1, context=np.random.default_rng(7).uniform(-1, 1, b1["context"].shape)
              .astype(np.float32))
    loss = jax.jit(jax.value_and_grad(lambda p, b: agent.world_model_loss(
        p, b, jax.random.PRNGKey(1))[0]))
    (l1, g1), (l2, g2) = loss(mp, b1), loss(mp, b2)
    assert float(l1) == float(l2)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    acts = []
    for b in (b1, b2):
        carry = agent.initial_carry(state.params, 2)
        obs = {k: b[k][:, 0] for k in spec.obs}
        obs["is_first"] = np.ones(2, bool)
        acts.append(np.asarray(agent.policy_step(state.params, carry, obs,
                                                 jax.random.PRNGKey(2))[0]))
    np.testing.assert_array_equal(acts[0], acts[1])
    # the same check sees the context where a method reads it
    crssm = Agent(tiny_config("crssm_d", obs="pixels"), spec)
    cp = crssm.model_params(crssm.init(jax.random.PRNGKey(0)).params)
    f = jax.jit(lambda p, b: crssm.world_model_loss(p, b, jax.random.PRNGKey(1))[0])
    b1c = random_batch(spec, B=2, T=crssm.sequence_length)
    b2c = dict(b1c, context=b2["context"][:, :crssm.sequence_length])
    assert float(f(cp, b1c)) != float(f(cp, b2c))

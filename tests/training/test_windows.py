"""Training windows equal acting windows.

Recorded streams of several episodes (lengths 3 to 30, so that some end inside the first
window and sampled sequences cross episode starts) are stored in the `Replay` the trainer
uses and acted on step by step with `policy_step`, the carry told the recorded (executed)
action after every step. The context of every chunk step of sampled training sequences
(`context_chunk` on H + T steps: history + chunk) must equal the acting-time context of
the same env step with the same parameters.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.training.replay import Replay

NUM_ENVS, STEPS = 2, 90


def _streams(spec, seed=0):
    """(NUM_ENVS, STEPS) recorded steps with episode starts at random points."""
    rng = np.random.default_rng(seed)
    first = np.zeros((NUM_ENVS, STEPS), bool)
    for e in range(NUM_ENVS):
        t = 0
        while t < STEPS:
            first[e, t] = True
            t += int(rng.integers(3, 31))
    data = dict(obs=rng.normal(size=(NUM_ENVS, STEPS, spec.obs["obs"][0][0])).astype(np.float32),
                context=np.zeros((NUM_ENVS, STEPS, 2), np.float32),
                action=rng.uniform(-1, 1, (NUM_ENVS, STEPS, spec.action_dim)).astype(np.float32),
                reward=np.zeros((NUM_ENVS, STEPS), np.float32), is_first=first,
                is_last=np.zeros((NUM_ENVS, STEPS), bool),
                is_terminal=np.zeros((NUM_ENVS, STEPS), bool),
                step_id=np.broadcast_to(np.arange(STEPS), (NUM_ENVS, STEPS)).astype(np.int32),
                env_id=np.broadcast_to(np.arange(NUM_ENVS)[:, None], (NUM_ENVS, STEPS))
                .astype(np.int32))
    return data


@pytest.mark.parametrize("readout", ["flatten", "mean"])
def test_training_context_equals_acting_context(agent_cache, readout):
    agent = agent_cache("dali_d", **{"context.readout": readout})
    K, T = agent.config.context.window, agent.config.train.batch_length
    assert agent.history == K and agent.sequence_length == K + T
    params = agent.init(jax.random.PRNGKey(0)).params
    data = _streams(agent.spec)

    # Acting: one policy step per recorded step, then the executed (recorded) action.
    carry = agent.initial_carry(params, NUM_ENVS)
    acting = []
    for t in range(STEPS):
        obs = {k: data[k][:, t] for k in ("obs", "context", "is_first")}
        _, carry = agent.policy_step(params, carry, obs, jax.random.PRNGKey(t))
        acting.append(np.asarray(carry["ctx_prev"]))
        carry = agent.executed(carry, data["action"][:, t])
    acting = np.stack(acting, 1)  # (NUM_ENVS, STEPS, Cc)

    # Training: sequences of H + T steps from the trainer's replay.
    spec = {k: (v.shape[2:], v.dtype) for k, v in data.items()}
    replay = Replay(10_000, NUM_ENVS, spec, seq_len=agent.sequence_length, seed=1)
    for t in range(STEPS):
        replay.add({k: v[:, t] for k, v in data.items()})
    chunk_ctx = jax.jit(lambda p, b: agent.context_chunk(p, b, None, T)[0])
    ep_start = np.maximum.accumulate(np.where(data["is_first"], np.arange(STEPS), 0), 1)
    checked = crossing = after_start = 0
    for _ in range(6):
        b = replay.sample(8)
        got = np.asarray(chunk_ctx(params, {k: jnp.asarray(v) for k, v in b.items()}))
        env, step = b["env_id"][:, K:], b["step_id"][:, K:]
        want = acting[env, step]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        checked += got.shape[0] * got.shape[1]
        crossing += int(b["is_first"][:, K + 1:].any(1).sum())
        after_start += int(((step - ep_start[env, step]) < K - 1).sum())
    # the samples covered chunks that cross an episode start and windows cut by one
    assert checked == 48 * T and crossing > 0 and after_start > 0


def test_history_defaults(agent_cache):
    """K steps of history for inferred-context methods, none for the others."""
    assert agent_cache("dreamer_dr").history == 0
    assert agent_cache("crssm_d").history == 0
    a = agent_cache("dali_s")
    assert a.history == a.config.context.window
    assert agent_cache("dali_d", **{"context.history": 0}).history == 0

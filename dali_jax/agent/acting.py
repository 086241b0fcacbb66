"""Acting: the carry of N environments and one policy step (`Agent.policy_step` is its jit).

Carry: dict(state=RSSM state (N, ...), prev_action (N, A) the executed action, window
(N, K, Din) context tokens (inferred-context methods), ctx_prev (N, Cc) the last context
(context methods)). At acting time c is recomputed every env step from the rolling window
of the last K steps (reset at episode starts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dali_jax.models import context_encoder as CE
from dali_jax.models import rssm as R

f32 = jnp.float32
sg = jax.lax.stop_gradient


def initial_carry(agent, params, n: int) -> dict:
    """Acting carry for n envs (before their first step)."""
    A = agent.spec.action_dim
    st = R.initial_state(agent.rssm, params["rssm"], n)
    carry = dict(state=st, prev_action=jnp.zeros((n, A), f32))
    if agent.ctx_dim:
        carry["ctx_prev"] = jnp.zeros((n, agent.ctx_dim), f32)
    if agent.inferred:
        K = agent.config.context.window
        carry["window"] = jnp.zeros((n, K, agent.token_obs_dim + A), f32)
    return carry


def policy_step(agent, params, carry, obs, rng, mode="sample"):
    """One acting step for N envs. obs: dict of (N, ...) incl. `is_first` (N,) bool.

    mode: "sample" (training/eval with sampled actions) or "mode" (deterministic).
    Returns (action (N, A), new carry). Continuous actions are clipped to
    [-model.action_clip, model.action_clip] (the env's bounds): the returned action is
    the executed one, and the carry's `prev_action` (next step's token and RSSM input)
    holds it. A caller that executes another action (the random prefill) records it
    with `executed(carry, action)`.
    """
    sw = agent.switches
    is_first = obs["is_first"].astype(bool)
    first = is_first.astype(f32)
    enc_obs = {k: obs[k] for k in agent.spec.obs}
    embed = agent.encoder.apply({"params": params["encoder"]}, enc_obs)
    prev_action = carry["prev_action"] * (1.0 - first)[:, None]
    new = dict(carry)
    ctx = None
    if sw.source == "ground_truth":
        ctx = obs["context"].astype(f32)
    elif agent.inferred:
        tok_obs = agent.token_obs(enc_obs, embed)
        if agent.release_compat:
            # Release: zero-initialised buffer, never reset, (o_k, a_{k-1}) pairs.
            tok = CE.tokens(tok_obs, carry["prev_action"])
            window = jnp.concatenate([carry["window"][:, 1:], tok[:, None]], 1)
        else:
            tok = CE.tokens(tok_obs, prev_action)
            rolled = jnp.concatenate([carry["window"][:, 1:], tok[:, None]], 1)
            fresh = jnp.broadcast_to(tok[:, None], rolled.shape)
            window = jnp.where(is_first[:, None, None], fresh, rolled)
        new["window"] = window
        ctx = agent.infer_context(params, window)
    ctx_post = ctx if sw.posterior else None
    ctx_dyn = None
    if sw.dynamics:
        ctx_dyn = jnp.where(is_first[:, None], ctx, carry["ctx_prev"])
    k1, k2 = jax.random.split(rng)
    post, _ = agent.rssm.apply({"params": params["rssm"]}, carry["state"], prev_action,
                              embed, is_first, k1, ctx_post, ctx_dyn,
                              method=R.RSSM.obs_step)
    dist = agent.policy_dist(params["actor"], agent.head_input(post, ctx))
    action = dist.sample(k2) if mode == "sample" else dist.mode()
    action = sg(action)
    clip = agent.config.model.action_clip
    if not agent.spec.discrete and clip > 0:  # the action the env executes
        action = jnp.clip(action, -clip, clip)
    new.update(state=post, prev_action=action)
    if agent.ctx_dim:
        new["ctx_prev"] = ctx
    return action, new


def executed(carry, action):
    """The carry after the env executed `action` (N, A) instead of the policy's."""
    return dict(carry, prev_action=jnp.asarray(action, f32))

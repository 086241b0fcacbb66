"""Open-loop imagination: decoding, imagination with a fixed context and
the DreamerV3-style open-loop video report. Pure functions of (agent, params, ...)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dali_jax.models import distributions as D
from dali_jax.models import rssm as R

f32 = jnp.float32
tmap = jax.tree_util.tree_map


def decode(agent, params, states, ctx=None):
    """Decoder means in observation space: vectors symexp'd, images clipped to [0, 1].
    states: (..., ...) RSSM states; ctx broadcast over their leading dims."""
    rec = agent.decoder.apply({"params": params["decoder"]}, agent.head_input(states, ctx))
    return {k: (jnp.clip(v, 0.0, 1.0) if k in agent.image_keys else D.symexp(v))
            for k, v in rec.items()}


def imagine_open_loop(agent, params, start, actions, ctx, rng, first_step=None,
                      ctx_heads=None):
    """Open-loop imagination under given actions with the context held fixed.

    start: RSSM state (N, ...) (used as is), or, when `first_step` = dict(prev_state,
    prev_action (N, A), embed (N, E), is_first (N,)) is given, the start posterior is
    recomputed with `ctx` (so shallow variants, where c only enters the posterior, see
    it too). actions: (N, H, A); ctx: (N, Cc) or None, read by the posterior and the
    dynamics; ctx_heads: the context the decoder reads (default ctx). Returns (states
    (N, H, ...), decoded dict (N, H, ...)), the decoded step k being the state after
    actions[:, k].
    """
    sw = agent.switches
    if first_step is not None:
        r0, rng = jax.random.split(rng)
        start, _ = agent.rssm.apply(
            {"params": params["rssm"]}, first_step["prev_state"], first_step["prev_action"],
            first_step["embed"], first_step["is_first"], r0,
            ctx if sw.posterior else None,
            ctx if sw.dynamics else None, method=R.RSSM.obs_step)
    states = R.imagine_actions(agent.rssm, params["rssm"], start, actions, rng,
                               ctx if sw.dynamics else None)
    heads = ctx if ctx_heads is None else ctx_heads
    return states, decode(agent, params, states, None if heads is None else heads[:, None])


def openloop_report(agent, params, batch, rng, context_steps: int = 5):
    """DreamerV3-style video report for pixel runs: filter the first `context_steps`
    steps of each sequence, imagine the rest open loop with the recorded actions,
    decode. batch: (B, T, ...) (a few sequences). Returns {key: (B, T, H, 3W, C)
    uint8}: true | model | error frames side by side, for every image key."""
    sw = agent.switches
    is_first = jnp.asarray(batch["is_first"]).at[:, 0].set(True)
    obs = {k: batch[k] for k in agent.spec.obs}
    embed = agent.encoder.apply({"params": params["encoder"]}, obs)
    ctx, _ = agent.context_chunk(params, batch, embed)
    prev_act = agent.prev_actions(jnp.asarray(batch["action"], f32), is_first)
    k1, k2 = jax.random.split(rng)
    n = context_steps
    post, _ = R.observe(agent.rssm, params["rssm"], embed[:, :n], prev_act[:, :n],
                        is_first[:, :n], k1,
                        ctx_post=ctx[:, :n] if sw.posterior else None,
                        ctx_dyn=agent.dyn_context(ctx, is_first)[:, :n]
                        if sw.dynamics else None)
    start = tmap(lambda x: x[:, -1], post)
    c_last = None if ctx is None else ctx[:, n - 1]
    states = R.imagine_actions(agent.rssm, params["rssm"], start,
                               jnp.asarray(batch["action"], f32)[:, n - 1:-1], k2,
                               c_last if sw.dynamics else None)
    rec_obs = decode(agent, params, post, ctx[:, :n] if ctx is not None else None)
    rec_img = decode(agent, params, states, None if c_last is None else c_last[:, None])
    out = {}
    for k in agent.image_keys:
        model = jnp.concatenate([rec_obs[k], rec_img[k]], 1)
        true = jnp.asarray(batch[k], f32) / 255.0
        err = (model - true + 1.0) / 2.0
        video = jnp.concatenate([true, model, err], 3)
        out[k] = (jnp.clip(video, 0, 1) * 255).astype(jnp.uint8)
    return out


def openloop_strips(agent, params, batch, rng, context_steps: int = 5):
    """`openloop_report` as one image per key: each sequence's every 4th frame side by side,
    sequences stacked. -> {key: (B * H, (T // 4) * 3W, C) uint8}."""
    out = {}
    for k, v in openloop_report(agent, params, batch, rng, context_steps).items():
        b, t, h, w, c = v[:, ::4].shape
        out[k] = v[:, ::4].transpose(0, 2, 1, 3, 4).reshape(b * h, t * w, c)
    return out

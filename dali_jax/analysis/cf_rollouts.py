"""Counterfactual imagination, the model side: episodes collected with the policy, the context
of a window, the windows imagined from and open-loop imagination from a window's filter step.

Used by ``dali_jax.analysis.counterfactual`` (procedure in its docstring); contexts are
(N, Cc) float32, imagined decodings dicts of (N, H, ...) float32.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dali_jax.analysis import physical_check as PC

__all__ = ["CounterfactualError", "CONTROL_DT", "Episodes", "collect_episodes", "context_fn",
           "pick_windows", "imaginer", "drop_check", "swap_check"]

CONTROL_DT = {"ball_in_cup": 0.02, "walker": 0.025}


class CounterfactualError(ValueError):
    """Bad input to the counterfactual tool (message says what and the valid values)."""


@dataclasses.dataclass
class Episodes:
    """Episodes collected with the policy; arrays (E, T, ...) with T = L + 1 observations.

    obs: observation keys of the spec (+ nothing else); action: action taken at t (zero at the
    last step); prev_action: a_{t-1} (zero at t = 0); is_first: (E, T) bool; state: the acting
    carry's RSSM state before step t (the posterior at t - 1)."""

    obs: dict
    action: np.ndarray
    prev_action: np.ndarray
    is_first: np.ndarray
    state: dict

    @property
    def length(self) -> int:
        return int(self.action.shape[1])


def collect_episodes(agent, params, task: str, obs_mode: str, context: dict, episodes: int,
                     episode_length: int, seed: int, mode: str = "sample") -> Episodes:
    """One episode per env at ``context`` with the agent's policy (envs in this process)."""
    import jax

    from dali_jax.envs.dmc import make_env
    from dali_jax.envs.vector import VectorEnv

    fns = [functools.partial(make_env, task, {0: dict(context)}, obs_mode=obs_mode,
                             seed=seed * 100003 + 7919 * i, time_limit=episode_length)
           for i in range(episodes)]
    venv = VectorEnv(fns, parallel=False)
    keys = list(agent.spec.obs)
    rec = {k: [] for k in keys}
    acts, prevs, firsts, states = [], [], [], []
    key = jax.random.PRNGKey(seed)
    try:
        obs = venv.reset()
        carry = agent.initial_carry(params, episodes)
        done = np.zeros(episodes, bool)
        while True:
            for k in keys:
                rec[k].append(np.asarray(obs[k]))
            first = np.asarray(obs["is_first"], bool)
            firsts.append(first)
            prevs.append(np.asarray(carry["prev_action"], np.float32) * (~first)[:, None])
            states.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                                 carry["state"]))
            key, sub = jax.random.split(key)
            action, carry = agent.policy_step(params, carry, obs, sub, mode=mode)
            action = np.asarray(action, np.float32)
            done |= np.asarray(obs["is_last"], bool)
            if done.all():
                acts.append(np.zeros_like(action))
                break
            acts.append(action)
            obs, _ = venv.step(action)
            if np.asarray(obs["is_first"], bool).any():
                raise CounterfactualError("an episode ended early (physics instability?) "
                                          "while collecting; try another --seed")
    finally:
        venv.close()
    sw = lambda xs: np.swapaxes(np.stack(xs), 0, 1)
    state = jax.tree_util.tree_map(lambda *xs: sw(list(xs)), *states)
    return Episodes(obs={k: sw(v) for k, v in rec.items()}, action=sw(acts),
                    prev_action=sw(prevs), is_first=sw(firsts), state=state)


def context_fn(agent, params, ep, K):
    """-> contexts_of([(episode, start)]) -> (M, Cc): g_phi over the K tokens from each start
    (inferred methods) or the env's true context there."""
    import jax
    import jax.numpy as jnp

    from dali_jax.models import context_encoder as CE

    if not agent.inferred:
        return lambda starts: np.stack([ep.obs["context"][e, s]
                                        for e, s in starts]).astype(np.float32)
    enc = jax.jit(lambda p, o: agent.encoder.apply({"params": p["encoder"]}, o))
    embed = np.concatenate([  # one episode at a time (one compiled shape)
        np.asarray(enc(params, {k: jnp.asarray(v[e:e + 1]) for k, v in ep.obs.items()}),
                   np.float32) for e in range(ep.is_first.shape[0])])
    tok_obs = np.asarray(agent.token_obs(ep.obs, jnp.asarray(embed)), np.float32)
    toks = np.asarray(CE.tokens(tok_obs, ep.prev_action), np.float32)  # (E, T, Din)
    infer = jax.jit(agent.infer_context)

    def contexts_of(starts):
        outs = []
        for i in range(0, len(starts), 512):
            w = np.stack([toks[e, s:s + K] for e, s in starts[i:i + 512]])
            outs.append(np.asarray(infer(params, jnp.asarray(w)), np.float32))
        return np.concatenate(outs)
    return contexts_of


def _filter_steps(ep, picks) -> dict:
    """The filter step into each (episode, start) of `picks`: previous state and action, the
    observation and is_first, as `imaginer` takes them."""
    import jax.numpy as jnp
    ei = np.array([e for e, _ in picks])
    si = np.array([s for _, s in picks])
    return dict(prev_state={k: jnp.asarray(v[ei, si]) for k, v in ep.state.items()},
                prev_action=jnp.asarray(ep.prev_action[ei, si]),
                obs={k: jnp.asarray(v[ei, si]) for k, v in ep.obs.items()},
                is_first=jnp.asarray(ep.is_first[ei, si]))


def drop_check(agent, params, obs_mode, default, K, sigma, chosen, scales, steps, starts,
               seed, mode, samples=PC.DEFAULT_SAMPLES) -> dict:
    """The physical check (`physical_check.physical_check`) from `starts` episode starts at
    the default context, each start's context inferred from its first K steps."""
    import jax
    ep = collect_episodes(agent, params, "ball_in_cup", obs_mode, default, starts, K + 1,
                          seed + 1, mode)
    picks = [(e, 0) for e in range(starts)]
    ctx = context_fn(agent, params, ep, K)(picks)
    first = _filter_steps(ep, [p for p in picks for _ in range(samples)])
    imagine = imaginer(agent, params, first, jax.random.PRNGKey(seed + 2))
    return PC.physical_check(imagine, ctx, sigma, chosen, scales, CONTROL_DT["ball_in_cup"],
                             agent.spec.action_dim, steps, samples)


def swap_check(agent, params, obs_mode, default, K, steps, starts, seed, mode,
               samples=PC.DEFAULT_SAMPLES, gravities=PC.SWAP_GRAVITIES) -> dict:
    """`physical_check.context_swap_check` from `starts` episode starts at each gravity (the
    other factors at `default`), each start's context inferred from its first K steps."""
    import jax
    import jax.numpy as jnp

    gravities = tuple(float(g) for g in gravities)
    if default["gravity"] not in gravities:
        raise CounterfactualError(f"the swap gravities {gravities} must hold the default "
                                  f"{default['gravity']}")
    picks = [(e, 0) for e in range(starts)]
    ctxs, firsts = [], []
    for i, g in enumerate(gravities):
        ep = collect_episodes(agent, params, "ball_in_cup", obs_mode, dict(default, gravity=g),
                              starts, K + 1, seed + 11 + i, mode)
        ctxs.append(context_fn(agent, params, ep, K)(picks))
        firsts.append(_filter_steps(ep, [p for p in picks for _ in range(samples)]))
    first = jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *firsts)
    imagine = imaginer(agent, params, first, jax.random.PRNGKey(seed + 3))
    G, cache = len(gravities), {}

    def fall(i, j):  # starts at gravity i, contexts from gravity j; one imagination per j
        if j not in cache:  # every gravity's block of starts gets gravity j's contexts
            cache[j] = PC.imagined_fall(imagine, np.concatenate([ctxs[j]] * G), None,
                                        CONTROL_DT["ball_in_cup"], agent.spec.action_dim,
                                        steps, samples).reshape(G, starts)
        return cache[j][i]
    return PC.context_swap_check(fall, gravities, gravities.index(default["gravity"]))


def pick_windows(agent, ep, s_max, windows, H, act_kind, seed):
    """Random window starts, the filter step into each (state, previous action, observation)
    and the H actions imagined from it. -> (picks [(e, s)], first step dict, actions (N, H, A))."""
    import jax.numpy as jnp

    E = ep.is_first.shape[0]
    rng = np.random.default_rng(seed)
    pool = [(e, s) for e in range(E) for s in range(0, s_max + 1)]
    n_win = min(windows, len(pool))
    if n_win < 5:
        raise CounterfactualError(f"only {len(pool)} window start(s) fit in the episodes; "
                                  f"need >= 5 (more --episodes or a longer --episode-length)")
    picks = [pool[i] for i in rng.choice(len(pool), n_win, replace=False)]
    first = _filter_steps(ep, picks)
    if act_kind == "zero":
        acts = np.zeros((n_win, H, agent.spec.action_dim), np.float32)
    else:
        acts = np.stack([ep.action[e, s:s + H] for e, s in picks]).astype(np.float32)
    return picks, first, jnp.asarray(acts)


def imaginer(agent, params, first, key):
    """-> imagine(actions (N, H, A), ctx (N, Cc), ctx_heads=None) -> decoded dict of float32
    (N, H, ...): open-loop imagination from the windows' filter step under a given context
    (`ctx_heads`: another context for the decoder only)."""
    import jax
    import jax.numpy as jnp

    from dali_jax.agent.imagination import imagine_open_loop

    gt_encoder = (agent.switches.source == "ground_truth"
                  and "context" in agent.enc_vector_keys)

    @jax.jit
    def run(p, fs, acts, ctx, ctx_heads, key):
        o = dict(fs["obs"])
        if gt_encoder:  # cRSSM-S: the context is an encoder input
            o["context"] = ctx.astype(o["context"].dtype)
        emb = agent.encoder.apply({"params": p["encoder"]}, o)
        step0 = dict(prev_state=fs["prev_state"], prev_action=fs["prev_action"], embed=emb,
                     is_first=fs["is_first"])
        _, dec = imagine_open_loop(agent, p, None, acts, ctx, key, first_step=step0,
                                   ctx_heads=ctx_heads)
        return dec

    def imagine(acts, ctx, ctx_heads=None):
        ctx = jnp.asarray(ctx, jnp.float32)
        heads = ctx if ctx_heads is None else jnp.asarray(ctx_heads, jnp.float32)
        dec = run(params, first, acts, ctx, heads, key)
        return {k: np.asarray(v, np.float32) for k, v in dec.items()}
    return imagine

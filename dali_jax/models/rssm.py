"""Recurrent state-space model (DreamerV3) with optional context inputs.

State: dict(deter=(B, D), logit=(B, S, C), stoch=(B, S, C)).
Where a context c (B, Cc) enters (DALI / cRSSM):
- `ctx_post`: appended to [h_t, embed_t] before the posterior (shallow integration);
- `ctx_dyn`: appended to [z_{t-1}, a_{t-1}] at the img_step input (deep integration).

`observe` and `imagine` are pure functions of (params, ...) scanning the cell with
`jax.lax.scan`; the cell's single steps are `RSSM.obs_step` / `RSSM.img_step`.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dali_jax.models import distributions as D
from dali_jax.models import fastgrad as FG
from dali_jax.models.nets import Dense, LayerNorm

f32 = jnp.float32
sg = jax.lax.stop_gradient


class RSSM(nn.Module):
    deter: int = 512
    units: int = 512
    stoch: int = 32
    classes: int = 32
    unimix: float = 0.01
    action_clip: float = 1.0
    dtype: jnp.dtype = f32
    # Width of [embed, c], the posterior's input besides h. When given, the posterior's two
    # blocks are initialised as the one layer on [h, embed, c] (fan-avg over its whole input).
    post_inputs: int = 0

    def setup(self):
        self.initial_w = self.param("initial", nn.initializers.zeros, (self.deter,), f32)
        self.img_in = Dense(self.units, dtype=self.dtype)
        self.gru = Dense(3 * self.deter, act="none", dtype=self.dtype)
        self.img_out = Dense(self.units, dtype=self.dtype)
        self.img_stats = Dense(self.stoch * self.classes, norm=False, act="none",
                               dtype=self.dtype)
        # The posterior layer act(LN([h, embed, c] W)), its kernel in two blocks: obs_h on h
        # (inside the filter scan) and obs_e on [embed, c] (on whole sequences, before it).
        # The same function and parameter count as one layer on the concatenation.
        linear = functools.partial(Dense, self.units, norm=False, act="none", bias=False,
                                   dtype=self.dtype)
        sh = se = 1.0
        if self.post_inputs:  # fan-avg scales: each block's fan_in + fan_out over the layer's
            whole = self.deter + self.post_inputs + self.units
            sh, se = (self.deter + self.units) / whole, (self.post_inputs + self.units) / whole
        self.obs_h, self.obs_e = linear(outscale=sh), linear(outscale=se)
        self.obs_norm = LayerNorm(act="silu")
        self.obs_stats = Dense(self.stoch * self.classes, norm=False, act="none",
                               dtype=self.dtype)

    # ----------------------------------------------------------------- pieces
    def _logits(self, layer, x):
        x = layer(x).astype(f32)
        x = x.reshape(x.shape[:-1] + (self.stoch, self.classes))
        return D.unimix_logits(x, self.unimix)

    def initial(self, batch: int):
        """Learned initial state: h0 = tanh(w), z0 = mode of the prior at h0."""
        deter = jnp.broadcast_to(jnp.tanh(self.initial_w), (batch, self.deter))
        logit = self._logits(self.img_stats, self.img_out(deter))
        stoch = jax.nn.one_hot(jnp.argmax(logit, -1), self.classes, dtype=f32)
        return dict(deter=deter, logit=logit, stoch=stoch)

    def _clip(self, action):
        if self.action_clip > 0:
            action = action * sg(self.action_clip / jnp.maximum(self.action_clip,
                                                                 jnp.abs(action)))
        return action

    def img_step(self, state, action, rng, ctx_dyn=None):
        """Prior step: (state_{t-1}, a_{t-1}[, c]) -> state_t sampled from the prior."""
        h = self.deter_step(state, action, ctx_dyn)
        logit = self.prior_logits(h)
        stoch = D.OneHot(logit, normalized=True).sample(rng)
        return dict(deter=h, logit=logit, stoch=stoch)

    def deter_step(self, state, action, ctx_dyn=None):
        """GRU update: (state_{t-1}, a_{t-1}[, c]) -> h_t (N, deter)."""
        stoch = state["stoch"].reshape(state["stoch"].shape[:-2] + (-1,))
        parts = [stoch, self._clip(action.astype(f32))]
        if ctx_dyn is not None:
            parts.append(ctx_dyn)
        x = self.img_in(jnp.concatenate(parts, -1))
        h = state["deter"]
        gates = self.gru(jnp.concatenate([h.astype(x.dtype), x], -1)).astype(f32)
        reset, cand, update = jnp.split(gates, 3, -1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * h

    def prior_logits(self, h):
        """(..., deter) -> prior logits (..., S, C) with unimix."""
        return self._logits(self.img_stats, self.img_out(h))

    def _reset(self, prev_state, prev_action, is_first, init):
        keep = 1.0 - is_first.astype(f32)
        if init is None:
            init = self.initial(is_first.shape[0])
        prev_state = jax.tree_util.tree_map(
            lambda p, i: p * _bcast(keep, p) + i * _bcast(1.0 - keep, i), prev_state, init)
        return prev_state, prev_action * keep[:, None]

    def obs_step(self, prev_state, prev_action, embed, is_first, rng, ctx_post=None,
                 ctx_dyn=None, init=None):
        """Filter step. Resets state and action where is_first (B,) to the learned initial
        state (`init`, computed here when not given). Returns (posterior, prior)."""
        prev_state, prev_action = self._reset(prev_state, prev_action, is_first, init)
        r1, r2 = jax.random.split(rng)
        prior = self.img_step(prev_state, prev_action, r1, ctx_dyn)
        post = self._posterior(prior["deter"], self.post_projection(embed, ctx_post), r2)
        return post, prior

    def post_projection(self, embed, ctx_post=None):
        """The [embed, c] block of the posterior layer: (..., E) [, (..., Cc)] -> (..., units).
        `observe` applies it to whole sequences at once, outside its scan."""
        x = embed if ctx_post is None else jnp.concatenate([embed, ctx_post.astype(embed.dtype)],
                                                           -1)
        return self.obs_e(x)

    def _posterior(self, h, proj, rng):
        """The posterior given h (B, deter) and the [embed, c] block's output `proj`
        (B, units): z ~ q(z | h, embed, c). -> state dict."""
        x = self.obs_norm(self.obs_h(h) + proj)
        logit = self._logits(self.obs_stats, x)
        return dict(deter=h, logit=logit, stoch=D.OneHot(logit, normalized=True).sample(rng))

    def filter_step(self, prev_state, prev_action, proj, is_first, rng, ctx_dyn=None,
                    init=None):
        """`obs_step` for `observe`: the embedding half of the posterior layer comes
        precomputed (`proj` (B, units) from `post_projection`), and the prior's logits and
        sample are left to the caller (they do not feed the recurrence). Same random
        stream as obs_step. Returns the posterior state."""
        prev_state, prev_action = self._reset(prev_state, prev_action, is_first, init)
        h = self.deter_step(prev_state, prev_action, ctx_dyn)
        return self._posterior(h, proj, jax.random.split(rng)[1])

    def __call__(self, *args, **kwargs):
        """`obs_step` (Flax's `init` calls this; it creates every parameter)."""
        return self.obs_step(*args, **kwargs)


def _bcast(v, like):
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def feat(state):
    """Model features [h, flat(z)]: (..., D + S*C)."""
    stoch = state["stoch"]
    return jnp.concatenate([state["deter"], stoch.reshape(stoch.shape[:-2] + (-1,))], -1)


def initial_state(rssm: RSSM, params, batch: int):
    return rssm.apply({"params": params}, batch, method=RSSM.initial)


def observe(rssm: RSSM, params, embed, prev_action, is_first, rng, state=None,
            ctx_post=None, ctx_dyn=None):
    """Filter a sequence with `lax.scan`.

    embed (B, T, E); prev_action (B, T, A) = action *before* step t; is_first (B, T);
    ctx_post / ctx_dyn: optional (B, T, Cc). state: optional start state (B, ...), the
    learned initial state when None. Returns (post, prior), dicts of (B, T, ...).

    Under differentiation the kernels of `DEFERRED` get their gradients after the scan, as
    one (in x B*T) @ (B*T x out) matmul each (`_filter`), instead of a B-row matmul and
    an accumulation per step; values and gradients equal the plain scan's (tested).
    """
    B, T = embed.shape[:2]
    if state is None:
        state = initial_state(rssm, params, B)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    rngs = jax.random.split(rng, T)

    init = initial_state(rssm, params, B)  # computed once, not at every step
    apply = functools.partial(rssm.apply, {"params": params})
    proj = apply(embed, ctx_post, method=RSSM.post_projection)  # (B, T, units), one matmul
    post = _filter(rssm, params, state, swap(prev_action), swap(proj), swap(is_first), rngs,
                   swap(ctx_dyn), init)
    post = jax.tree_util.tree_map(swap, post)
    # The prior needs only h_t: its head runs on all (B, T) states at once. Its sample uses
    # obs_step's key for it (unused by the losses, so removed when jitted).
    logit = apply(post["deter"], method=RSSM.prior_logits)
    r1 = jax.vmap(lambda k: jax.random.split(k)[0])(rngs)
    stoch = jax.vmap(lambda lg, k: D.OneHot(lg, normalized=True).sample(k), (1, 0), 1)(logit, r1)
    return post, dict(deter=post["deter"], logit=logit, stoch=stoch)


# Layers of the filter step whose kernel gradients `observe` computes after its scan (the
# posterior's obs_e block runs outside the scan and gets its gradient by autodiff).
DEFERRED = ("img_in", "gru", "obs_h", "obs_stats")


def _filter(rssm, params, state, actions, proj, is_first, rngs, ctx_dyn, init):
    """The filter scan over time-major inputs (T, B, ...) -> posterior states (T, B, ...),
    the `DEFERRED` kernels differentiated after the scan (see `observe`)."""
    return FG.scan_deferring(rssm, params, RSSM.filter_step, DEFERRED, state,
                             (actions, proj, is_first, rngs, ctx_dyn), (init,))


def imagine(rssm: RSSM, params, policy: Callable, start, horizon: int, rng, ctx_dyn=None,
            outputs: Callable | None = None):
    """Imagination with a policy: `policy(state, rng)` -> action (N, A), or a dict with an
    "action" entry plus per-step extras (e.g. the policy entropy) that are kept too.

    start: state dict (N, ...). ctx_dyn: optional (N, Cc), held fixed over the horizon.
    outputs: optional `outputs(state) -> dict` of per-state outputs (e.g. predicted reward)
    computed for the imagined states only; their entry 0 (the start state) is zeros.
    Returns a trajectory dict of (H + 1, N, ...) including the start state and an
    `action` entry (the action taken in each state).
    """
    def act(state, key):
        out = policy(state, key)
        return out if isinstance(out, dict) else {"action": out}

    r0, rng = jax.random.split(rng)
    start = dict(start, **act(start, r0))

    def step(prev, key):
        k1, k2 = jax.random.split(key)
        state = rssm.apply({"params": params}, prev, prev["action"], k1, ctx_dyn,
                           method=RSSM.img_step)
        nxt = dict(state, **act(state, k2))
        carry = dict(state, action=nxt["action"])  # the extras do not feed the recurrence
        return carry, (nxt if outputs is None else dict(nxt, **outputs(nxt)))

    carry = {k: start[k] for k in ("deter", "logit", "stoch", "action")}
    _, traj = jax.lax.scan(step, carry, jax.random.split(rng, horizon))
    zeros = lambda tree: jax.tree_util.tree_map(lambda v: jnp.zeros(v.shape[1:], v.dtype), tree)
    start = dict(start, **{k: zeros(v) for k, v in traj.items() if k not in start})
    return jax.tree_util.tree_map(lambda s, t: jnp.concatenate([s[None], t], 0), start, traj)


def imagine_actions(rssm: RSSM, params, start, actions, rng, ctx_dyn=None):
    """Open-loop imagination under given actions (N, H, A) from start (N, ...).

    Returns prior states (N, H, ...): state k is the result of applying actions[:, k].
    """
    def step(prev, inp):
        a, key = inp
        state = rssm.apply({"params": params}, prev, a, key, ctx_dyn, method=RSSM.img_step)
        return state, state

    H = actions.shape[1]
    _, traj = jax.lax.scan(step, start, (jnp.swapaxes(actions, 0, 1), jax.random.split(rng, H)))
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)


def kl_losses(post, prior, free: float = 1.0):
    """DreamerV3 KL terms, each (B, T): dyn = max(free, KL(sg(post)||prior)),
    rep = max(free, KL(post||sg(prior))); KL summed over the S categoricals."""
    cat = lambda logit: D.OneHot(logit, 1, normalized=True)
    dyn = cat(sg(post["logit"])).kl(cat(prior["logit"]))
    rep = cat(post["logit"]).kl(cat(sg(prior["logit"])))
    return jnp.maximum(dyn, free), jnp.maximum(rep, free), dyn

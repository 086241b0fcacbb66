"""The losses that train the context encoder g_phi, and their heads.

Alignment: `transition_indices` picks, per window, the
transitions its context must explain (those inside the window, the paper's),
`alignment_loss` scores f_psi / the inverse head on them; targets may be residual
(o_{j+1} - o_j) and standardised with running moments (`target_moments`).
`alignment_loss_per_step` is the same loss computed from per-step parts (every pair is a
transition j -> j + 1 of the sequence, so its input's observation part and its target are
per step; `fastgrad.pair_mse`): the training path, equal to `alignment_loss` in tests.

Also here: the chi (cross-modal) term.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dali_jax.models import fastgrad as FG
from dali_jax.models.context_encoder import gather_windows
from dali_jax.models.nets import Dense

f32 = jnp.float32
sg = jax.lax.stop_gradient


class DynamicsHead(nn.Module):
    """f_psi (forward) or the inverse model: MLP layers x units SiLU (biased) + linear out."""
    out_dim: int
    layers: int = 2
    units: int = 128
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Dense(self.units, norm=False, act="silu", dtype=self.dtype, name=f"h{i}")(x)
        return Dense(self.out_dim, norm=False, act="none", dtype=self.dtype,
                     name="out")(x).astype(f32)


class CrossModal(nn.Module):
    """chi heads: linear c -> s (state_dim) and sg(s) -> c (Linear + LayerNorm + SiLU)."""
    state_dim: int
    ctx_dim: int = 8
    dtype: jnp.dtype = f32

    def setup(self):
        self.to_state = Dense(self.state_dim, norm=False, act="none", dtype=self.dtype)
        self.to_ctx = Dense(self.ctx_dim, dtype=self.dtype)

    def __call__(self, c, s):
        return self.to_state(c).astype(f32), self.to_ctx(s).astype(f32)


def transition_indices(idx):
    """Transitions (j -> j + 1) whose dynamics the context of each window must explain.

    idx: (B, T, K) windows of the last T steps of a sequence. The pairs are the consecutive
    steps inside the window of step t (the paper's; padded duplicates are not pairs).
    Returns (src (B, T, P), dst (B, T, P), valid (B, T, P) float32).
    """
    src, dst = idx[..., :-1], idx[..., 1:]
    return src, dst, (dst == src + 1).astype(f32)


def forward_targets(obs, src, dst, residual: bool = False):
    """f_psi's target of each transition: o_dst, or o_dst - o_src when `residual`."""
    o_dst = gather_windows(obs, dst)
    return o_dst - gather_windows(obs, src) if residual else o_dst


def target_moments(obs, is_first, residual: bool = False):
    """Batch mean and variance (Do,) of the forward targets of all within-episode
    transitions of a (B, L, Do) sequence (for the running standardisation)."""
    tgt = obs[:, 1:] - obs[:, :-1] if residual else obs[:, 1:]
    w = (~is_first[:, 1:]).astype(f32)[..., None]
    n = jnp.maximum(w.sum((0, 1)), 1.0)
    mean = (tgt * w).sum((0, 1)) / n
    var = (((tgt - mean) ** 2) * w).sum((0, 1)) / n
    return mean, var


def alignment_loss(forward_fn, inverse_fn, obs, action, trans, ctx, mode: str = "forward",
                   residual: bool = False, norm=None, inverse_weight: float = 1.0):
    """Dynamics-alignment loss of every window, in one vectorised call. -> (B, T).

    obs: (B, L, Do) token observations (raw obs or stop-gradient embeddings); action:
    (B, L, A) action executed at each step; trans: `transition_indices` (src, dst, valid)
    (B, T, P); ctx: (B, T, Cc) context of each window. Window t averages, over its valid
    transitions j -> j + 1:
    - forward: ||f([o_j, a_j, c_t]) - y||^2 / Do with y = o_{j+1} (the paper), or
      o_{j+1} - o_j (`residual`), standardised as (y - mean) / std when `norm` = (mean,
      std) (Do,) is given;
    - inverse: ||inv([o_j, o_{j+1}, c_t]) - a_j||^2 / A (the correct target a_j, not the
      release's a_{j+1}); both: forward + inverse_weight * inverse.
    """
    src, dst, valid = trans
    o = gather_windows(obs, src)
    c = jnp.broadcast_to(ctx[:, :, None], valid.shape + ctx.shape[-1:])
    err = jnp.zeros(valid.shape, f32)
    if mode in ("forward", "both"):
        a = gather_windows(action, src)
        y = forward_targets(obs, src, dst, residual)
        pred = forward_fn(jnp.concatenate([o, a, c], -1))
        if norm is not None:
            y = (y - norm[0]) / norm[1]
        err = err + jnp.mean((pred - y) ** 2, -1)
    if mode in ("inverse", "both"):
        pred = inverse_fn(jnp.concatenate([o, gather_windows(obs, dst), c], -1))
        w = inverse_weight if mode == "both" else 1.0
        err = err + w * jnp.mean((pred - gather_windows(action, src)) ** 2, -1)
    return jnp.sum(err * valid, -1) / jnp.maximum(1.0, jnp.sum(valid, -1))


def transition_steps(obs, action, residual: bool = False, norm=None):
    """Per-step parts of transition j -> j + 1 of a (B, L, ...) sequence: forward input
    [o_j, a_j] and target (`alignment_loss`'s y), inverse input [o_j, o_{j+1}] and target
    a_j. The last step's are padding: no transition starts there. -> dict of (B, L, ...)."""
    nxt = jnp.concatenate([obs[:, 1:], obs[:, -1:]], 1)
    y = nxt - obs if residual else nxt
    if norm is not None:
        y = (y - norm[0]) / norm[1]
    return dict(forward_in=jnp.concatenate([obs, action], -1), forward_y=y,
                inverse_in=jnp.concatenate([obs, nxt], -1), inverse_y=action)


def alignment_loss_per_step(forward_params, inverse_params, obs, action, trans, ctx,
                            mode: str = "forward", residual: bool = False, norm=None,
                            inverse_weight: float = 1.0):
    """`alignment_loss` with the heads given as DynamicsHead params, computed per step where
    it can (`fastgrad.pair_mse`). Every valid pair of `trans` must be a transition
    j -> j + 1 (`transition_indices` gives only those). -> (B, T)."""
    src, _, valid = trans
    s = transition_steps(obs, action, residual, norm)
    err = jnp.zeros(valid.shape, f32)
    if mode in ("forward", "both"):
        err = err + FG.pair_mse(forward_params, s["forward_in"], ctx, src, s["forward_y"])
    if mode in ("inverse", "both"):
        w = inverse_weight if mode == "both" else 1.0
        err = err + w * FG.pair_mse(inverse_params, s["inverse_in"], ctx, src, s["inverse_y"])
    return jnp.sum(err * valid, -1) / jnp.maximum(1.0, jnp.sum(valid, -1))


def crossmodal_loss(cross_fn, ctx, state_feat, fit_map: bool = True):
    """chi term, (B, T). cross_fn(c, s) -> (s_hat, c_hat).

    ||sg(s_hat(c)) - s||^2 pulls the world-model state towards the context;
    ||c_hat(sg(s)) - c||^2 predicts the context from the state. With `fit_map` the linear
    map is also fitted (||s_hat(c) - sg(s)||^2); the release stop-gradients its only term,
    so there that map never leaves its random initialisation.
    """
    s_hat, c_hat = cross_fn(ctx, sg(state_feat))
    loss = jnp.mean((sg(s_hat) - state_feat) ** 2, -1) + jnp.mean((c_hat - ctx) ** 2, -1)
    if fit_map:  # fitted on sg(c): the map follows the state, c is not pulled towards s
        s_fit, _ = cross_fn(sg(ctx), sg(state_feat))
        loss = loss + jnp.mean((s_fit - sg(state_feat)) ** 2, -1)
    return loss

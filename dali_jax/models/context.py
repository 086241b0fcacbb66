"""DALI context inference: the encoder g_phi, its dynamics-alignment heads and losses.

Tokens. Step k of an episode is the token x_k = [o_k, a_{k-1}] (a_{-1} = 0 at the episode
start): the observation (raw features, or the world-model embedding for pixels) paired with
the action that led to it. The same pairing is used for training and for acting, so the
context at step t, c_t = g_phi(x_{t-K+1..t}), only needs what is known before acting at t.

Windows. The window of step t holds the last K steps of the current episode; before the
episode start (or before the first step of a training chunk) it is edge-padded with the
first available step. `window_indices` gives these indices for a whole (B, T) chunk so that
all T windows are built with one gather (no Python loop over prefixes).

Encoders (hidden H = 256, output c = SiLU(LayerNorm(Linear_ctx(features)))):
- transformer: per-step Dense(H) -> pre-LN single-head self-attention + residual
  (no mask, no positional encoding) -> pre-LN feed-forward (2 x Dense(H)) + residual;
- attention: per-step Dense(H) -> LN -> self-attention (no feed-forward, no residual);
- gru: per-step Dense(H) -> GRU over the window -> Dense(H) on the final state;
- mlp: flattened window -> 2 x Dense(H).
Readout for transformer / attention: "flatten" (K*H -> ctx, the release; ties the encoder
to K) or "mean" (mean over the window; any K).

Because there is no positional encoding, each token's projection, LayerNorm, query, key
and value-times-output-matrix are the same in every window that contains it: the chunk
path computes them once per step and gathers, which is exact (same operations) and makes
the 64 overlapping windows of a chunk cost little more than one.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.models.nets import Dense, LayerNorm

f32 = jnp.float32
sg = jax.lax.stop_gradient


def window_indices(is_first, window: int):
    """(B, T) bool -> (B, T, K) int: indices of the causal, episode-bounded window of each step."""
    T = is_first.shape[1]
    t = jnp.arange(T)
    start = jax.lax.cummax(jnp.where(is_first, t[None], 0), axis=1)  # (B, T)
    raw = t[:, None] - (window - 1) + jnp.arange(window)[None]  # (T, K)
    return jnp.maximum(raw[None], start[:, :, None])


def full_chunk_indices(batch: int, length: int):
    """Release behaviour: every step sees the whole chunk (future steps included). (B, T, T)."""
    return jnp.broadcast_to(jnp.arange(length)[None, None], (batch, length, length))


def gather_windows(x, idx):
    """x (B, T, ...) and idx (B, T, K) -> (B, T, K, ...)."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def tokens(obs_vec, prev_action):
    """Context-encoder tokens [o_k, a_{k-1}]: (..., Do) and (..., A) -> (..., Do + A)."""
    return jnp.concatenate([obs_vec.astype(f32), prev_action.astype(f32)], -1)


class ContextEncoder(nn.Module):
    """g_phi. `__call__(windows)`: (N, K, Din) -> (N, ctx_dim);
    `chunk(x, idx)`: per-step tokens (B, T, Din) and window indices (B, T, K) -> (B, T, ctx_dim).
    """
    kind: str = "transformer"
    hidden: int = 256
    ctx_dim: int = 8
    window: int = 64
    readout: str = "flatten"
    mlp_layers: int = 2
    dtype: jnp.dtype = f32

    def setup(self):
        H = self.hidden
        if self.readout not in ("flatten", "mean"):
            raise ValueError(f"context readout must be 'flatten' or 'mean', got {self.readout!r}")
        if self.kind in ("transformer", "attention", "gru"):
            self.proj = Dense(H, dtype=self.dtype)
        if self.kind in ("transformer", "attention"):
            self.norm1 = LayerNorm()
            self.query = Dense(H, norm=False, act="none", dtype=self.dtype)
            self.key = Dense(H, norm=False, act="none", dtype=self.dtype)
            self.value = Dense(H, norm=False, act="none", dtype=self.dtype)
            self.out_kernel = self.param("out_kernel", nn.initializers.variance_scaling(
                1.0, "fan_avg", "truncated_normal"), (H, H), f32)
            self.out_bias = self.param("out_bias", nn.initializers.zeros, (H,), f32)
        if self.kind == "transformer":
            self.norm2 = LayerNorm()
            self.ff1 = Dense(H, dtype=self.dtype)
            self.ff2 = Dense(H, dtype=self.dtype)
        if self.kind == "gru":
            self.gru_kernel = self.param("gru_kernel", nn.initializers.variance_scaling(
                1.0, "fan_avg", "truncated_normal"), (2 * H, 3 * H), f32)
            self.gru_bias = self.param("gru_bias", nn.initializers.zeros, (3 * H,), f32)
            self.lin_out = Dense(H, dtype=self.dtype)
        if self.kind == "mlp":
            self.layers = [Dense(H, dtype=self.dtype) for _ in range(self.mlp_layers)]
        self.ctx_out = Dense(self.ctx_dim, dtype=self.dtype)

    # Per-step (window-independent) quantities.
    def _per_step(self, x):
        if self.kind == "mlp":
            return dict(x=x.astype(f32))
        p = self.proj(x)
        if self.kind == "gru":
            return dict(p=p)
        n = self.norm1(p)
        vo = self.value(n) @ self.out_kernel.astype(self.dtype)
        return dict(p=p, q=self.query(n), k=self.key(n), vo=vo)

    # Window-dependent part. Every entry of `s` is (..., K, .).
    def _block(self, s):
        if self.kind == "mlp":
            x = s["x"].reshape(s["x"].shape[:-2] + (-1,))
            for layer in self.layers:
                x = layer(x)
            return self.ctx_out(x).astype(f32)
        if self.kind == "gru":
            return self.ctx_out(self.lin_out(self._gru(s["p"]))).astype(f32)
        logits = jnp.einsum("...qd,...kd->...qk", s["q"], s["k"]) / np.sqrt(self.hidden)
        att = jax.nn.softmax(logits.astype(f32), -1).astype(s["vo"].dtype)
        x = self._after_attention(s["p"], jnp.einsum("...qk,...kd->...qd", att, s["vo"]))
        x = x.reshape(x.shape[:-2] + (-1,)) if self.readout == "flatten" else x.mean(-2)
        return self.ctx_out(x).astype(f32)

    def _after_attention(self, p, a):
        """Output bias, then (transformer) residual and pre-LN feed-forward: (..., H)."""
        a = a + self.out_bias.astype(self.dtype)
        if self.kind == "attention":
            return a
        x = p + a
        return x + self.ff2(self.ff1(self.norm2(x)))

    def _gru(self, p):
        """GRU over the window axis of p (..., K, H) -> final hidden (..., H)."""
        lead = p.shape[:-2]
        xs = jnp.moveaxis(p.reshape((-1,) + p.shape[-2:]), 1, 0)  # (K, N, H)

        w = self.gru_kernel.astype(self.dtype)
        b = self.gru_bias.astype(self.dtype)

        def step(h, x):
            g = (jnp.concatenate([h.astype(x.dtype), x], -1) @ w + b).astype(f32)
            r, c, u = jnp.split(g, 3, -1)
            r = jax.nn.sigmoid(r)
            c = jnp.tanh(r * c)
            u = jax.nn.sigmoid(u - 1.0)
            return u * c + (1 - u) * h, None

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], self.hidden), f32), xs)
        return h.reshape(lead + (self.hidden,))

    def __call__(self, windows):
        return self._block(self._per_step(windows))

    def chunk(self, x, idx, causal: bool = True):
        """Context of every window of a chunk: x (B, T, Din), idx (B, T, K) -> (B, T, Cc).

        causal: idx holds causal windows (every index of window t in [t - K + 1, t], as
        `window_indices` gives); False for any indices (e.g. `full_chunk_indices`).
        """
        per = self._per_step(x)
        if self.kind in ("transformer", "attention"):
            return self._attend_pairs(per, idx, causal)
        return self._block({k: gather_windows(v, idx) for k, v in per.items()})

    def _attend_pairs(self, s, idx, causal):
        """Attention windows of a chunk without gathering queries, keys and values.

        s: per-step quantities (B, T, .); idx: (B, T, K). A window is a multiset of the
        chunk's tokens, n[t, l] = how often token l fills a position of window t (edge
        padding repeats one), so the output of query token j in window t is
        sum_l n[t, l] e^{q_j k_l} vo_l / sum_l n[t, l] e^{q_j k_l}: one (T x T) score
        matrix per sequence, masked per window by log n. Everything after the attention is
        per (window t, token j) pair, computed once per pair however often j repeats in
        the window: the pairs are the static band t - K + 1 <= j <= t (P = sum_t min(t+1, K)
        <= T K rows; all T^2 pairs when not `causal`), and the window's positions pick their
        pair at the readout. Same operations as the gather path up to summation order
        (tested equal).
        """
        B, T, K = idx.shape
        tt, jj, offset = _pairs(T, K, causal)
        n = jax.nn.one_hot(idx, T, dtype=f32).sum(-2)  # (B, T, T)
        scores = jnp.einsum("bjd,bld->bjl", s["q"], s["k"]).astype(f32) / np.sqrt(self.hidden)
        mask = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1.0)), -1e30)
        att = jax.nn.softmax(scores[:, jj] + mask[:, tt], -1).astype(s["vo"].dtype)  # (B, P, T)
        x = self._after_attention(s["p"][:, jj],
                                  jnp.einsum("bpl,bld->bpd", att, s["vo"]))  # (B, P, H)
        if self.readout == "flatten":
            lo = np.maximum(np.arange(T) - K + 1, 0) if causal else np.zeros(T, int)
            rows = (offset - lo)[None, :, None] + idx  # (B, T, K) pair of each position
            x = jnp.take_along_axis(x, rows.reshape(B, T * K, 1), axis=1)
            x = x.reshape(B, T, -1)  # (B, T, K * H)
        else:  # mean
            w = n[:, tt, jj] / K  # (B, P) share of each pair in its window
            x = jax.ops.segment_sum(jnp.moveaxis(x * w[..., None].astype(x.dtype), 1, 0),
                                    tt, T, indices_are_sorted=True)
            x = jnp.moveaxis(x, 0, 1)  # (B, T, H)
        return self.ctx_out(x).astype(f32)


@functools.lru_cache(maxsize=64)
def _pairs(T: int, K: int, causal: bool):
    """Static (window t, token j) pairs, sorted by t: j in [max(0, t-K+1), t] when causal,
    else all j. Returns (tt (P,), jj (P,), offset (T,) = first pair of each window)."""
    lo = np.maximum(np.arange(T) - K + 1, 0) if causal else np.zeros(T, int)
    hi = np.arange(T) if causal else np.full(T, T - 1)
    tt = np.concatenate([np.full(h - l + 1, t) for t, (l, h) in enumerate(zip(lo, hi))])
    jj = np.concatenate([np.arange(l, h + 1) for l, h in zip(lo, hi)])
    offset = np.concatenate([[0], np.cumsum(hi - lo + 1)[:-1]])
    return tt, jj, offset


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


def alignment_loss(forward_fn, inverse_fn, obs, action, idx, ctx, mode: str = "forward"):
    """Dynamics-alignment loss of every window of a chunk, in one vectorised call.

    obs: (B, T, Do) prediction targets (raw obs or stop-gradient embeddings);
    action: (B, T, A) action taken at step t; idx: (B, T, K) window indices;
    ctx: (B, T, Cc) context of each window. For window t the loss averages, over the
    consecutive pairs (j, j+1) inside the window, ||f([o_j, a_j, c_t]) - o_{j+1}||^2 / Do
    (forward) and/or ||inv([o_j, o_{j+1}, c_t]) - a_j||^2 / A (inverse; the correct target
    a_j, not the release's a_{j+1}). Padded duplicates are not pairs. Returns (B, T).
    """
    o = gather_windows(obs, idx)
    a = gather_windows(action, idx)
    valid = (idx[..., 1:] == idx[..., :-1] + 1).astype(f32)  # (B, T, K-1)
    c = jnp.broadcast_to(ctx[:, :, None], valid.shape + ctx.shape[-1:])
    err = jnp.zeros(valid.shape, f32)
    if mode in ("forward", "both"):
        pred = forward_fn(jnp.concatenate([o[:, :, :-1], a[:, :, :-1], c], -1))
        err = err + jnp.mean((pred - o[:, :, 1:]) ** 2, -1)
    if mode in ("inverse", "both"):
        pred = inverse_fn(jnp.concatenate([o[:, :, :-1], o[:, :, 1:], c], -1))
        err = err + jnp.mean((pred - a[:, :, :-1]) ** 2, -1)
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
    if fit_map:
        loss = loss + jnp.mean((s_hat - sg(state_feat)) ** 2, -1)
    return loss

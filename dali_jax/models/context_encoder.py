"""DALI context inference: the tokens, the windows and the encoder g_phi.

Tokens. Step k of an episode is the token x_k = [o_k, a_{k-1}] (a_{-1} = 0 at the episode
start): the observation (raw features, or the world-model embedding for pixels) paired with
the action that led to it. The same pairing is used for training and for acting, so the
context at step t, c_t = g_phi(x_{t-K+1..t}), only needs what is known before acting at t.

Windows. The window of step t holds the last K steps of the current episode; before the
episode start it is edge-padded with the episode's first step, exactly as the acting buffer
is. Training sequences carry history (K steps sampled before each chunk, used only for
tokens), so every chunk step sees the same window in training as at acting time.
`window_indices` gives these indices for a whole (B, L) sequence so that all windows are
built with one gather (no Python loop over prefixes).

Encoders (hidden H = 256, output c = SiLU(LayerNorm(Linear_ctx(features)))):
- transformer: per-step Dense(H) -> pre-LN single-head self-attention + residual
  (no mask, no positional encoding) -> pre-LN feed-forward (2 x Dense(H)) + residual;
- attention: per-step Dense(H) -> LN -> self-attention (no feed-forward, no residual);
- gru: per-step Dense(H) -> GRU over the window -> Dense(H) on the final state;
- mlp: flattened window -> 2 x Dense(H).
Readout for transformer / attention: "flatten" (K*H -> ctx, the release) or "mean" (mean
over the window, with learned positional embeddings added to the projected tokens so that
the order of the window, e.g. which o_k follows which, is not lost).

Without positional embeddings (the flatten readout), each token's projection, LayerNorm,
query, key and value-times-output-matrix are the same in every window that contains it:
the chunk path computes them once per step and gathers, which is exact (same operations)
and makes the overlapping windows of a chunk cost little more than one.

The losses that train g_phi (dynamics alignment, chi) are in `alignment`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.models.nets import Dense, LayerNorm

f32 = jnp.float32


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
        if self.positional:
            self.pos = self.param("pos", nn.initializers.normal(0.02), (self.window, H), f32)
        self.ctx_out = Dense(self.ctx_dim, dtype=self.dtype)

    @property
    def positional(self) -> bool:
        """Learned positional embeddings: attention encoders with the order-free mean readout
        (the flatten readout keeps each position's own weights)."""
        return self.kind in ("transformer", "attention") and self.readout == "mean"

    # Per-step (window-independent) quantities.
    def _per_step(self, x):
        if self.kind == "mlp":
            return dict(x=x.astype(f32))
        p = self.proj(x)
        if self.positional:  # x: (..., K, Din) windows
            p = p + self.pos.astype(p.dtype)
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
        """Context of windows over a sequence: x (B, L, Din) tokens, idx (B, T, K) -> (B, T, Cc).

        Window i of idx belongs to step L - T + i of the sequence (the last T steps; the
        first L - T steps are history that only fills windows). causal: idx holds causal
        windows (every index of the window of step t in [t - K + 1, t], as
        `window_indices` gives); False for any indices (e.g. `full_chunk_indices`).
        """
        if self.positional:  # tokens differ by window position: gather every window
            return self(gather_windows(x, idx))
        per = self._per_step(x)
        if self.kind in ("transformer", "attention"):
            return self._attend_pairs(per, idx, causal)
        return self._block({k: gather_windows(v, idx) for k, v in per.items()})

    def _attend_pairs(self, s, idx, causal):
        """Attention windows of a sequence without gathering queries, keys and values
        (the flatten readout; the mean readout's positional embeddings differ per window
        position, so `chunk` gathers its windows).

        s: per-step quantities (B, L, .); idx: (B, T, K), the windows of the last T steps.
        A window is a multiset of the sequence's tokens, n[t, l] = how often token l fills
        a position of window t (edge padding repeats one), so the output of query token j
        in window t is sum_l n[t, l] e^{q_j k_l} vo_l / sum_l n[t, l] e^{q_j k_l}: one
        (L x L) score matrix per sequence, masked per window by log n. Everything after
        the attention is per (window t, token j) pair, computed once per pair however
        often j repeats in the window: the pairs are the static band
        t - K + 1 <= j <= t (at most T K rows; all T L pairs when not `causal`), and the
        window's positions pick their pair at the readout. Same operations as the gather
        path up to summation order (tested equal).
        """
        B, T, K = idx.shape
        L = s["p"].shape[1]
        tt, jj, offset, lo = _pairs(L, T, K, causal)
        n = jax.nn.one_hot(idx, L, dtype=f32).sum(-2)  # (B, T, L)
        scores = jnp.einsum("bjd,bld->bjl", s["q"], s["k"]).astype(f32) / np.sqrt(self.hidden)
        mask = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1.0)), -1e30)
        att = jax.nn.softmax(scores[:, jj] + mask[:, tt], -1).astype(s["vo"].dtype)  # (B, P, L)
        x = self._after_attention(s["p"][:, jj],
                                  jnp.einsum("bpl,bld->bpd", att, s["vo"]))  # (B, P, H)
        rows = (offset - lo)[None, :, None] + idx  # (B, T, K) pair of each position
        x = jnp.take_along_axis(x, rows.reshape(B, T * K, 1), axis=1)
        return self.ctx_out(x.reshape(B, T, -1)).astype(f32)  # (B, T, K * H) -> (B, T, Cc)


@functools.lru_cache(maxsize=64)
def _pairs(L: int, T: int, K: int, causal: bool):
    """Static (window i, token j) pairs of the windows of steps t = L - T + i, sorted by i:
    j in [max(0, t-K+1), t] when causal, else all j < L. Returns (ii (P,), jj (P,),
    offset (T,) = first pair of each window, lo (T,) = its first token)."""
    t = np.arange(L - T, L)
    lo = np.maximum(t - K + 1, 0) if causal else np.zeros(T, int)
    hi = t if causal else np.full(T, L - 1)
    ii = np.concatenate([np.full(h - l + 1, i) for i, (l, h) in enumerate(zip(lo, hi))])
    jj = np.concatenate([np.arange(l, h + 1) for l, h in zip(lo, hi)])
    offset = np.concatenate([[0], np.cumsum(hi - lo + 1)[:-1]])
    return ii, jj, offset, lo

"""Dreamer's distributions, written by hand (no runtime dependency on tfp/distrax).

Every class is a light container of arrays used inside jitted code. Shapes below use
`...` for arbitrary batch dimensions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

sg = jax.lax.stop_gradient
f32 = jnp.float32


def symlog(x):
    """sign(x) * log(1 + |x|), elementwise."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    """Inverse of symlog: sign(x) * (exp(|x|) - 1)."""
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def twohot_bins(num_bins: int = 255, low: float = -20.0, high: float = 20.0) -> jnp.ndarray:
    """Bin centres in symlog space, shape (num_bins,)."""
    return jnp.linspace(low, high, num_bins, dtype=f32)


def twohot_encode(y, bins):
    """Two-hot encoding of values `y` (...,) already in bin space -> (..., num_bins).

    The mass is split between the two neighbouring bins in inverse proportion to the
    distance; values outside the range put all mass on the edge bin.
    """
    y = jnp.asarray(y, f32)
    n = bins.shape[0]
    y_c = jnp.clip(y, bins[0], bins[-1])
    above = jnp.clip(jnp.searchsorted(bins, y_c, side="right"), 1, n - 1)
    below = above - 1
    lo, hi = bins[below], bins[above]
    w_hi = jnp.clip((y_c - lo) / (hi - lo), 0.0, 1.0)
    return (jax.nn.one_hot(below, n, dtype=f32) * (1.0 - w_hi)[..., None]
            + jax.nn.one_hot(above, n, dtype=f32) * w_hi[..., None])


class TwoHot:
    """Discrete regression head ("symlog_disc"): logits (..., 255) over symlog-space bins."""

    def __init__(self, logits, bins=None):
        self.logits = logits.astype(f32)
        self.bins = twohot_bins(logits.shape[-1]) if bins is None else bins

    def mean(self):
        """Expected value in real space: symexp(sum(softmax * bins)), shape (...)."""
        return symexp(jnp.sum(jax.nn.softmax(self.logits, -1) * self.bins, -1))

    mode = mean

    def log_prob(self, y):
        """sum(twohot(symlog(y)) * log_softmax(logits)), shape (...)."""
        target = twohot_encode(symlog(y), self.bins)
        return jnp.sum(target * jax.nn.log_softmax(self.logits, -1), -1)


def unimix_logits(logits, unimix: float = 0.01):
    """log of (1 - unimix) * softmax(logits) + unimix / K, same shape as logits."""
    if not unimix:
        return jax.nn.log_softmax(logits.astype(f32), -1)
    probs = jax.nn.softmax(logits.astype(f32), -1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return jnp.log(probs)


class OneHot:
    """Categorical over the last axis with straight-through one-hot samples.

    logits: (..., K) unnormalised logits, normalised here with log_softmax; pass
    `normalized=True` for log-probabilities that already sum to one (`unimix_logits`'
    output) to skip that pass (same values and gradients: log_softmax is the identity
    there, and its Jacobian's correction term vanishes on a normalised input).
    `event_dims` trailing batch axes are summed in log_prob / entropy / kl (32 latents -> 1).
    """

    def __init__(self, logits, event_dims: int = 0, normalized: bool = False):
        logits = logits.astype(f32)
        self.logits = logits if normalized else jax.nn.log_softmax(logits, -1)
        self.event_dims = event_dims

    def _sum(self, x):
        return x.sum(tuple(range(-self.event_dims, 0))) if self.event_dims else x

    @property
    def probs(self):
        return jnp.exp(self.logits)

    def sample(self, rng):
        """Straight-through one-hot sample: onehot + p - sg(p), shape (..., K).

        Drawn by inverting the CDF with one uniform per categorical (K times fewer random
        numbers than Gumbel-max; on CPU the random bits dominated an imagination step).
        """
        p = self.probs
        k = p.shape[-1]
        cdf = sg(p) @ jnp.triu(jnp.ones((k, k), f32))  # inclusive prefix sums, (..., K)
        u = jax.random.uniform(rng, p.shape[:-1] + (1,), f32) * cdf[..., -1:]
        below = (cdf <= u).astype(f32)  # 1 for the bins entirely below u
        below = below.at[..., -1].set(0.0)  # u rounded up to the total: the last bin
        first = jnp.concatenate([jnp.ones_like(below[..., :1]), below[..., :-1]], -1)
        onehot = first * (1.0 - below)  # the first bin whose cdf exceeds u
        return sg(onehot) + p - sg(p)

    def mode(self):
        onehot = jax.nn.one_hot(jnp.argmax(self.logits, -1), self.logits.shape[-1], dtype=f32)
        p = self.probs
        return sg(onehot) + p - sg(p)

    def log_prob(self, onehot):
        return self._sum(jnp.sum(onehot * self.logits, -1))

    def entropy(self):
        return self._sum(-jnp.sum(self.probs * self.logits, -1))

    def kl(self, other: "OneHot"):
        """KL(self || other), summed over the event dims, shape (...)."""
        return self._sum(jnp.sum(self.probs * (self.logits - other.logits), -1))


class Bernoulli:
    """Bernoulli from logits (...,); mode is 1 where p > 0.5."""

    def __init__(self, logits):
        self.logits = logits.astype(f32)

    def mean(self):
        return jax.nn.sigmoid(self.logits)

    def mode(self):
        return (self.logits > 0).astype(f32)

    def log_prob(self, x):
        x = x.astype(f32)
        return x * jax.nn.log_sigmoid(self.logits) + (1 - x) * jax.nn.log_sigmoid(-self.logits)

    def entropy(self):
        p = self.mean()
        return -(p * jax.nn.log_sigmoid(self.logits) + (1 - p) * jax.nn.log_sigmoid(-self.logits))


class BoundedNormal:
    """Dreamer's continuous actor: Normal(tanh(mu), std), independent over the last axis.

    mean, std: (..., A). std = (max - min) * sigmoid(raw + 2) + min is computed by the caller
    (see `bounded_std`). Samples are not squashed (the env clips), as in DreamerV3.
    """

    def __init__(self, mean, std):
        self.loc = mean.astype(f32)
        self.std = std.astype(f32)

    def sample(self, rng):
        return self.loc + self.std * jax.random.normal(rng, self.loc.shape, f32)

    def mode(self):
        return self.loc

    def log_prob(self, x):
        z = (x - self.loc) / self.std
        return jnp.sum(-0.5 * z ** 2 - jnp.log(self.std) - 0.5 * np.log(2 * np.pi), -1)

    def entropy(self):
        return jnp.sum(0.5 + 0.5 * np.log(2 * np.pi) + jnp.log(self.std), -1)


def bounded_std(raw, min_std: float = 0.1, max_std: float = 1.0):
    """(max - min) * sigmoid(raw + 2) + min."""
    return (max_std - min_std) * jax.nn.sigmoid(raw.astype(f32) + 2.0) + min_std


def symlog_mse(pred, target, event_dims: int = 1):
    """Negative log-likelihood of Dreamer's SymlogDist(mse, sum): sum((pred - symlog(y))^2)."""
    d = (pred.astype(f32) - symlog(target.astype(f32))) ** 2
    return d.sum(tuple(range(-event_dims, 0)))


def mse(pred, target, event_dims: int = 3):
    """sum((pred - y)^2) over the last `event_dims` axes (images: H, W, C)."""
    d = (pred.astype(f32) - target.astype(f32)) ** 2
    return d.sum(tuple(range(-event_dims, 0)))

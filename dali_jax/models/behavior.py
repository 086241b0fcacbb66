"""Actor-critic in imagination (DreamerV3): lambda returns, return normalisation, losses.

Trajectories are time-major: (H + 1, N, ...), step 0 being the posterior start state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32
sg = jax.lax.stop_gradient


def lambda_returns(reward, cont, value, gamma: float, lam: float):
    """Bootstrapped lambda returns, all arrays (H + 1, N); reward[t], cont[t] belong to
    arriving in state t (index 0 unused). Returns R (H, N) for t = 0..H-1 with
    R_H = V_H and R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) V_{t+1} + lam R_{t+1})."""
    disc = gamma * cont[1:]
    interm = reward[1:] + disc * (1.0 - lam) * value[1:]

    def step(nxt, inp):
        i, d = inp
        ret = i + d * lam * nxt
        return ret, ret

    _, rets = jax.lax.scan(step, value[-1], (interm, disc), reverse=True)
    return rets


def trajectory_weight(cont, gamma: float):
    """w_t = prod_{i<=t}(gamma * c_i) / gamma, (H + 1, N), stop-gradient."""
    return sg(jnp.cumprod(gamma * cont, 0) / gamma)


def retnorm_update(state, returns, decay: float = 0.99, lo_q: float = 5.0, hi_q: float = 95.0):
    """EMA of the 5th/95th return percentiles. state = dict(lo=(), hi=()).
    Returns (new_state, scale) with scale = max(1, hi - lo) from the updated state."""
    r = sg(returns).astype(f32)
    lo = decay * state["lo"] + (1 - decay) * jnp.percentile(r, lo_q)
    hi = decay * state["hi"] + (1 - decay) * jnp.percentile(r, hi_q)
    new = dict(lo=lo, hi=hi)
    return new, jnp.maximum(1.0, hi - lo)


def actor_loss(logp_or_none, entropy, returns, value, scale, weight, actent: float,
               discrete: bool):
    """DreamerV3 actor loss (scalar).

    returns, value: (H, N) lambda returns and critic values of the first H states;
    entropy / logp: (H, N); weight: (H + 1, N). Continuous actions backpropagate through
    the returns (dynamics); discrete ones use REINFORCE with the advantage as a constant.
    """
    adv = (returns - value) / scale
    if discrete:
        pg = logp_or_none * sg(adv)
    else:
        pg = adv
    loss = -(pg + actent * entropy)
    return jnp.mean(loss * weight[:-1]), adv


def critic_loss(critic_dist, slow_mean, returns, weight, slowreg: float = 1.0):
    """-log p(R) + slowreg * -log p(slow critic mean), weighted, mean; (H, N) inputs."""
    loss = -critic_dist.log_prob(sg(returns)) - slowreg * critic_dist.log_prob(sg(slow_mean))
    return jnp.mean(loss * weight[:-1])

"""Ball-in-Cup physical check of counterfactual imagination: does moving the context change
the imagined ball's free fall as gravity would?

Every episode starts with the ball at rest and the string slack, so under zero actions it
falls freely for the first control steps: its vertical velocity drops by g dt per step.
Later the string is taut and the mean acceleration over a long horizon is about 0 whatever
the gravity (`benchmarks/physical_check_on_simulator.py`). The check imagines from the
filter step at episode starts, zero actions, and reads the free-fall acceleration as the
least-squares slope of the decoded ball z velocity over the first `steps` + 1 imagined
steps,

    a = sum_k (k - kbar) v_k / (dt sum_k (k - kbar)^2),  k = 0 .. steps,

averaged over `samples` imagined trajectories per start (the latent is sampled). The
velocity, not the second difference of the decoded position, because 1/dt^2 = 2500 turns
a 1 mm decoding error into 2.5 m/s^2.

`physical_check`: for each shift s of the chosen dimension (c + s sigma_d e_d), Spearman's
rho between s and a over all (start, shift) pairs, the mean a per shift and rho per
dimension. `context_swap_check`: contexts inferred at other gravities swapped in. A context
that moves the imagined physics as the training gravities did gives rho near -1.
"""
from __future__ import annotations

import numpy as np

BALL_VZ_INDEX = 7  # ball_in_cup obs = [cup x, z, ball x, z, cup vx, vz, ball vx, vz]
DEFAULT_STEPS = 4
DEFAULT_SAMPLES = 8


def fall_acceleration(v, dt: float, steps: int = DEFAULT_STEPS):
    """Least-squares slope of the velocity v (..., T) over its first `steps` + 1 values,
    per second: the mean acceleration there. T >= steps + 1. -> (...)."""
    v = np.asarray(v, np.float64)
    if v.shape[-1] < steps + 1:
        raise ValueError(f"need {steps + 1} velocities for a slope over {steps} steps; "
                         f"got {v.shape[-1]}")
    k = np.arange(steps + 1, dtype=np.float64)
    k -= k.mean()
    return (v[..., :steps + 1] * k).sum(-1) / ((k ** 2).sum() * dt)


def imagined_fall(imagine, ctx, ctx_heads, dt: float, action_dim: int,
                  steps: int = DEFAULT_STEPS, samples: int = DEFAULT_SAMPLES):
    """imagine(actions (M, H, A), ctx (M, Cc), ctx_heads (M, Cc) | None) -> decoded dict
    whose imagination starts from M = samples * N filter steps (the N starts repeated
    `samples` times, start-major); ctx, ctx_heads: (N, Cc). -> (N,) the free-fall
    acceleration of each start, averaged over its samples."""
    import jax.numpy as jnp
    n = len(ctx)
    rep = lambda c: None if c is None else np.repeat(np.asarray(c, np.float32), samples, 0)
    zero = jnp.zeros((n * samples, steps + 1, action_dim), jnp.float32)
    v = imagine(zero, rep(ctx), rep(ctx_heads))["obs"][..., BALL_VZ_INDEX]
    return fall_acceleration(v, dt, steps).reshape(n, samples).mean(1)


def _spearman(x, y) -> tuple[float, float]:
    from scipy.stats import spearmanr
    if np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


ROUTES = ("both", "dynamics", "heads")


def physical_check(imagine, ctx0, sigma, chosen: int, scales, dt: float, action_dim: int,
                   steps: int = DEFAULT_STEPS, samples: int = DEFAULT_SAMPLES) -> dict:
    """imagine: as `imagined_fall` takes it, from N episode starts; ctx0 (N, Cc) their
    contexts;
    sigma (Cc,). The shift goes to the posterior, the dynamics and the decoder; for the
    chosen dimension also to the posterior and dynamics only (the decoder reads ctx0) and
    to the decoder only (`by_route`): which part of the model turns c into the fall. -> the
    summary dict (the chosen dimension's accelerations (N, S) under "_accelerations")."""
    n, cc = ctx0.shape
    s = np.asarray(scales, np.float64)

    def accel(d, route="both"):
        rows = []
        for scale in s:
            delta = np.zeros(cc, np.float32)
            delta[d] = scale * sigma[d]
            shifted = ctx0 + delta[None]
            ctx, heads = {"both": (shifted, None), "dynamics": (shifted, ctx0),
                          "heads": (ctx0, shifted)}[route]
            rows.append(imagined_fall(imagine, ctx, heads, dt, action_dim, steps, samples))
        return np.stack(rows, 1)  # (N, S)

    per_dim = {d: accel(d) for d in range(cc)}
    rho_of = {d: _spearman(np.broadcast_to(s[None], a.shape).ravel(), a.ravel())
              for d, a in per_dim.items()}
    rhos = [r for r, _ in rho_of.values()]
    acc = per_dim[chosen]
    means = acc.mean(0)
    by_route = {}
    for route in ROUTES[1:]:
        a = accel(chosen, route)
        by_route[route] = dict(
            spearman_rho=_spearman(np.broadcast_to(s[None], a.shape).ravel(), a.ravel())[0],
            mean_acceleration=a.mean(0).tolist())
    return dict(
        dim=chosen, scales_sigma=s.tolist(), deltas=(s * float(sigma[chosen])).tolist(),
        mean_acceleration=means.tolist(), spearman_rho=rho_of[chosen][0],
        spearman_p=rho_of[chosen][1], spearman_rho_of_means=_spearman(s, means)[0],
        starts=int(n), steps=int(steps), samples=int(samples),
        spearman_rho_per_dim={str(d): r for d, (r, _) in rho_of.items()},
        mean_acceleration_per_dim={str(d): a.mean(0).tolist() for d, a in per_dim.items()},
        by_route=by_route,
        gravity_aligned_dim=(None if all(np.isnan(rhos)) else int(np.nanargmax(np.abs(rhos)))),
        ball_vz_index=BALL_VZ_INDEX, control_dt=dt, actions="zero",
        note=f"slope of the decoded ball z velocity over the first {steps} steps after an "
             f"episode start (free fall), mean of {samples} samples per start; rho over all "
             "(start, shift) pairs",
        _accelerations=acc)


SWAP_GRAVITIES = (4.905, 7.3575, 9.81, 12.2625, 14.715)  # 0.5 .. 1.5 x the default


def context_swap_check(fall, gravities, default_index: int) -> dict:
    """Does the imagined free fall follow the context the model is given, the state it starts
    from, or both? ``fall(i, j)`` -> (N,) free-fall accelerations imagined from N episode
    starts collected at ``gravities[i]`` under the contexts inferred from N episodes at
    ``gravities[j]`` (paired by episode). Three sweeps over the gravity g, each with
    Spearman's rho(g, acceleration) over all (start, g) pairs and the mean per g:

    * ``context``: starts at the default gravity, contexts from g (c alone moves);
    * ``state``: starts at g, contexts from the default gravity (the filter state alone);
    * ``matched``: starts and contexts at g (as in an episode at g).

    The simulator gives acceleration -g (rho -1) in every sweep."""
    g = np.asarray(gravities, np.float64)
    out = {}
    for name, ij in (("context", lambda k: (default_index, k)),
                     ("state", lambda k: (k, default_index)),
                     ("matched", lambda k: (k, k))):
        a = np.stack([fall(*ij(k)) for k in range(len(g))], 1)  # (N, G)
        out[name] = dict(spearman_rho=_spearman(np.broadcast_to(g[None], a.shape).ravel(),
                                                a.ravel())[0],
                         mean_acceleration=a.mean(0).tolist())
    return dict(gravities=g.tolist(), starts=int(a.shape[0]), **out)


def simulator_check(gravities, episodes: int = 8, steps: int = DEFAULT_STEPS,
                    horizon: int = 64, seed: int = 0) -> dict:
    """The estimator on the Ball-in-Cup simulator: episodes reset at each gravity, zero
    actions; -> rho(g, free-fall acceleration) and rho(g, mean acceleration over `horizon`
    steps), with the mean free-fall acceleration per gravity."""
    from dali_jax.envs.dmc import make_env

    dt = 0.02
    fall, mean_h, gs = [], [], []
    for g in gravities:
        for e in range(episodes):
            env = make_env("ball_in_cup", {0: {"gravity": float(g), "string_length": 0.3}},
                           seed=seed + e)
            obs, _ = env.reset(seed=seed + e)
            v = []
            for _ in range(horizon):
                obs, *_ = env.step(np.zeros(2, np.float32))
                v.append(obs["obs"][BALL_VZ_INDEX])  # after each action, as imagination decodes
            env.close()
            v = np.asarray(v)
            fall.append(fall_acceleration(v, dt, steps))
            mean_h.append((v[-1] - v[0]) / (dt * (horizon - 1)))
            gs.append(float(g))
    gs, fall, mean_h = map(np.asarray, (gs, fall, mean_h))
    return dict(gravities=[float(g) for g in gravities], episodes=episodes, steps=steps,
                horizon=horizon, rho_fall=_spearman(gs, fall)[0],
                rho_mean_over_horizon=_spearman(gs, mean_h)[0],
                fall_acceleration_per_gravity=[float(fall[gs == g].mean()) for g in gravities],
                mean_acceleration_per_gravity=[float(mean_h[gs == g].mean())
                                               for g in gravities])

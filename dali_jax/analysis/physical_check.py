"""Ball-in-Cup physical check of counterfactual imagination: does shifting one context
dimension change the imagined ball's free fall as gravity would?

At every episode start the ball is released with the string slack, so under zero actions
it falls freely for the first control steps: its vertical acceleration there is -g. Later
the string is taut and the ball hangs or swings, and the mean acceleration over a long
horizon is (v_end - v_start) / duration, about 0 whatever the gravity (on the simulator,
Spearman rho(g, mean acceleration over 64 steps) is 0.02 from episode starts:
`benchmarks/physical_check_on_simulator.py`). The check therefore imagines from the filter
step at episode starts, zero actions, and measures the acceleration over the first `steps`
second differences of the decoded ball z:

    a = mean_k (z_{k+2} - 2 z_{k+1} + z_k) / dt^2,  k = 0 .. steps - 1

for each shift s of the chosen dimension (c + s sigma_d e_d); reported: Spearman's rho
between s and a over all (start, shift) pairs, the mean a per shift and rho per dimension.
A dimension that encodes gravity as the training contexts did gives rho near -1 or +1.
"""
from __future__ import annotations

import numpy as np

BALL_Z_INDEX = 3  # ball_in_cup obs = [cup x, cup z, ball x, ball z, 4 velocities]
DEFAULT_STEPS = 4


def fall_acceleration(z, dt: float, steps: int = DEFAULT_STEPS):
    """Mean vertical acceleration over the first `steps` second differences of z (..., T),
    T >= steps + 2. -> (...)."""
    z = np.asarray(z, np.float64)
    if z.shape[-1] < steps + 2:
        raise ValueError(f"need {steps + 2} positions for {steps} second differences; "
                         f"got {z.shape[-1]}")
    return (np.diff(z[..., :steps + 2], n=2, axis=-1) / dt ** 2).mean(-1)


def _spearman(x, y) -> tuple[float, float]:
    from scipy.stats import spearmanr
    if np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


ROUTES = ("both", "dynamics", "heads")


def physical_check(imagine, ctx0, sigma, chosen: int, scales, dt: float, action_dim: int,
                   steps: int = DEFAULT_STEPS) -> dict:
    """imagine(actions (N, H, A), ctx (N, Cc), ctx_heads=None) -> decoded dict with "obs"
    (N, H, Do), from the filter step at N episode starts; ctx0 (N, Cc) their contexts;
    sigma (Cc,). The shift goes to the posterior, the dynamics and the decoder; for the
    chosen dimension also to the posterior and dynamics only (the decoder reads ctx0) and
    to the decoder only (`by_route`): which part of the model turns c into the fall. -> the
    summary dict (the chosen dimension's accelerations (N, S) under "_accelerations")."""
    import jax.numpy as jnp

    n, cc = ctx0.shape
    zero = jnp.zeros((n, steps + 2, action_dim), jnp.float32)
    s = np.asarray(scales, np.float64)

    def accel(d, route="both"):
        rows = []
        for scale in s:
            delta = np.zeros(cc, np.float32)
            delta[d] = scale * sigma[d]
            shifted = ctx0 + delta[None]
            ctx, heads = {"both": (shifted, None), "dynamics": (shifted, ctx0),
                          "heads": (ctx0, shifted)}[route]
            z = imagine(zero, ctx, heads)["obs"][..., BALL_Z_INDEX]
            rows.append(fall_acceleration(z, dt, steps))
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
        starts=int(n), steps=int(steps),
        spearman_rho_per_dim={str(d): r for d, (r, _) in rho_of.items()},
        mean_acceleration_per_dim={str(d): a.mean(0).tolist() for d, a in per_dim.items()},
        by_route=by_route,
        gravity_aligned_dim=(None if all(np.isnan(rhos)) else int(np.nanargmax(np.abs(rhos)))),
        ball_z_index=BALL_Z_INDEX, control_dt=dt, actions="zero",
        note=f"acceleration over the first {steps} second differences of the decoded ball z "
             "after an episode start (free fall); rho over all (start, shift) pairs",
        _accelerations=acc)


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
            z = [obs["obs"][BALL_Z_INDEX]]
            for _ in range(horizon):
                obs, *_ = env.step(np.zeros(2, np.float32))
                z.append(obs["obs"][BALL_Z_INDEX])
            env.close()
            z = np.asarray(z[1:])  # positions after each action, as imagination decodes
            fall.append(fall_acceleration(z, dt, steps))
            mean_h.append(fall_acceleration(z, dt, horizon - 2))
            gs.append(float(g))
    gs, fall, mean_h = map(np.asarray, (gs, fall, mean_h))
    return dict(gravities=[float(g) for g in gravities], episodes=episodes, steps=steps,
                horizon=horizon, rho_fall=_spearman(gs, fall)[0],
                rho_mean_over_horizon=_spearman(gs, mean_h)[0],
                fall_acceleration_per_gravity=[float(fall[gs == g].mean()) for g in gravities],
                mean_acceleration_per_gravity=[float(mean_h[gs == g].mean())
                                               for g in gravities])

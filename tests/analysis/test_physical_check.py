"""The Ball-in-Cup physical check: its estimator against free fall by hand and on the
simulator, and the check's rho on a fake imagination whose physics is known."""
import numpy as np
import pytest

from dali_jax.analysis import physical_check as PC

DT = 0.02


def test_fall_acceleration_is_minus_g_in_free_fall():
    t = DT * np.arange(1, 10)
    for g in (4.9, 9.81, 14.7):
        z = 0.4 + 0.3 * t - 0.5 * g * t ** 2
        assert PC.fall_acceleration(z, DT, 5) == pytest.approx(-g, rel=1e-9)
    with pytest.raises(ValueError, match="need 7 positions"):
        PC.fall_acceleration(np.zeros(6), DT, 5)


def test_on_the_simulator_free_fall_follows_gravity_and_the_horizon_mean_does_not():
    """Zero actions from episode resets: the first 4 second differences give about -g;
    the mean over 64 steps (the ball ends hanging on the string) stays near 0."""
    r = PC.simulator_check((4.9, 14.7), episodes=2, steps=4, horizon=64)
    for g, a in zip(r["gravities"], r["fall_acceleration_per_gravity"]):
        assert a == pytest.approx(-g, rel=0.15)
    assert max(abs(a) for a in r["mean_acceleration_per_gravity"]) < 1.0
    assert r["rho_fall"] < -0.85


def test_check_on_an_imagination_whose_dimension_0_is_gravity():
    """imagine: ball z falls with g = 9.81 + 2 c_0 in its dynamics (dimension 1 and the
    decoder's context have no effect): rho = -1 on dimension 0 and through the dynamics,
    undefined (constant acceleration) on dimension 1 and through the decoder alone."""
    import jax.numpy as jnp

    def imagine(actions, ctx, ctx_heads=None):
        n, h, _ = actions.shape
        t = DT * np.arange(1, h + 1)
        g = 9.81 + 2.0 * np.asarray(ctx)[:, :1]
        obs = np.zeros((n, h, 8), np.float32)
        obs[..., PC.BALL_Z_INDEX] = 0.5 - 0.5 * g * t[None] ** 2
        return {"obs": jnp.asarray(obs)}

    ctx0 = np.zeros((4, 2), np.float32)
    sigma = np.array([0.5, 1.0], np.float32)
    r = PC.physical_check(imagine, ctx0, sigma, chosen=0, scales=(-2, 0, 2), dt=DT,
                          action_dim=2)
    assert r["spearman_rho"] == pytest.approx(-1.0)
    assert r["gravity_aligned_dim"] == 0 and np.isnan(r["spearman_rho_per_dim"]["1"])
    np.testing.assert_allclose(r["mean_acceleration"], [-(9.81 - 2), -9.81, -(9.81 + 2)],
                               rtol=1e-3)
    assert r["_accelerations"].shape == (4, 3) and r["starts"] == 4 and r["steps"] == 4
    assert r["by_route"]["dynamics"]["spearman_rho"] == pytest.approx(-1.0)
    assert np.isnan(r["by_route"]["heads"]["spearman_rho"])

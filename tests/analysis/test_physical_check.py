"""The Ball-in-Cup physical check: its estimator against free fall by hand and on the
simulator, and the checks' rho on a fake imagination whose physics is known."""
import numpy as np
import pytest

from dali_jax.analysis import physical_check as PC

DT = 0.02


def test_fall_acceleration_is_the_velocity_slope():
    """A constant acceleration -g gives -g; the least-squares slope of 0, 1, 0, 1, 0 (no
    trend) is 0; noise on one velocity moves the slope by (k - kbar) e / (dt sum (k-kbar)^2)."""
    t = DT * np.arange(1, 10)
    for g in (4.9, 9.81, 14.7):
        v = 0.3 - g * t
        assert PC.fall_acceleration(v, DT, 4) == pytest.approx(-g, rel=1e-9)
    assert PC.fall_acceleration(np.array([0.0, 1, 0, 1, 0]), DT, 4) == pytest.approx(0.0)
    e = np.zeros(5)
    e[4] = 0.01  # k - kbar = 2, sum (k - kbar)^2 = 10
    assert PC.fall_acceleration(e, DT, 4) == pytest.approx(2 * 0.01 / (DT * 10))
    with pytest.raises(ValueError, match="need 6 velocities"):
        PC.fall_acceleration(np.zeros(5), DT, 5)


def test_on_the_simulator_free_fall_follows_gravity_and_the_horizon_mean_does_not():
    """Zero actions from episode resets: the first 4 steps give about -g (a start with the
    ball touching the cup, as seed 0's, bends the first steps); the mean over 64 steps (the
    ball ends hanging on the string) stays near 0."""
    r = PC.simulator_check((4.9, 14.7), episodes=2, steps=4, horizon=64)
    for g, a in zip(r["gravities"], r["fall_acceleration_per_gravity"]):
        assert a == pytest.approx(-g, rel=0.15)
    assert max(abs(a) for a in r["mean_acceleration_per_gravity"]) < 1.0
    assert r["rho_fall"] < -0.85


def _imagine_with(gravity_of, noise=0.0):
    """A fake imagination: the ball's z velocity falls with gravity_of(ctx, ctx_heads) (M,),
    plus Gaussian noise, from the filter steps the rows stand for."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)

    def imagine(actions, ctx, ctx_heads=None):
        m, h, _ = actions.shape
        g = gravity_of(np.asarray(ctx), None if ctx_heads is None else np.asarray(ctx_heads))
        obs = np.zeros((m, h, 8), np.float32)
        obs[..., PC.BALL_VZ_INDEX] = (-g[:, None] * DT * np.arange(1, h + 1)[None]
                                      + noise * rng.standard_normal((m, h)))
        return {"obs": jnp.asarray(obs)}
    return imagine


def test_check_on_an_imagination_whose_dimension_0_is_gravity():
    """Dynamics g = 9.81 + 2 c_0 (dimension 1 and the decoder's context have no effect):
    rho = -1 on dimension 0 and through the dynamics, undefined (constant acceleration) on
    dimension 1 and through the decoder alone; with noise, `samples` averages it away."""
    imagine = _imagine_with(lambda c, heads: 9.81 + 2.0 * c[:, 0])
    ctx0 = np.zeros((4, 2), np.float32)
    sigma = np.array([0.5, 1.0], np.float32)
    r = PC.physical_check(imagine, ctx0, sigma, chosen=0, scales=(-2, 0, 2), dt=DT,
                          action_dim=2, samples=3)
    assert r["spearman_rho"] == pytest.approx(-1.0)
    assert r["gravity_aligned_dim"] == 0 and np.isnan(r["spearman_rho_per_dim"]["1"])
    np.testing.assert_allclose(r["mean_acceleration"], [-(9.81 - 2), -9.81, -(9.81 + 2)],
                               rtol=1e-3)
    assert r["_accelerations"].shape == (4, 3) and r["starts"] == 4 and r["samples"] == 3
    assert r["by_route"]["dynamics"]["spearman_rho"] == pytest.approx(-1.0)
    assert np.isnan(r["by_route"]["heads"]["spearman_rho"])
    noisy = _imagine_with(lambda c, heads: np.full(len(c), 9.81), noise=0.05)
    one = PC.imagined_fall(noisy, ctx0, None, DT, 2, samples=1)
    many = PC.imagined_fall(noisy, ctx0, None, DT, 2, samples=64)
    assert np.abs(many + 9.81).max() < np.abs(one + 9.81).max() / 3


def test_context_swap_separates_what_the_context_and_the_state_carry():
    """fall(i, j): starts at gravity i, contexts from gravity j. A model whose fall follows
    the context only: rho -1 in the context and matched sweeps, undefined (constant) in the
    state sweep; one that follows the start's state only: the reverse."""
    gs = (4.9, 9.81, 14.7)
    by_context = PC.context_swap_check(lambda i, j: np.full(3, -gs[j]), gs, 1)
    assert by_context["context"]["spearman_rho"] == pytest.approx(-1.0)
    assert by_context["matched"]["spearman_rho"] == pytest.approx(-1.0)
    assert np.isnan(by_context["state"]["spearman_rho"])
    np.testing.assert_allclose(by_context["context"]["mean_acceleration"], [-4.9, -9.81, -14.7])
    np.testing.assert_allclose(by_context["state"]["mean_acceleration"], [-9.81] * 3)
    by_state = PC.context_swap_check(lambda i, j: np.full(3, -gs[i]), gs, 1)
    assert np.isnan(by_state["context"]["spearman_rho"])
    assert by_state["state"]["spearman_rho"] == pytest.approx(-1.0)
    assert by_state["starts"] == 3 and by_state["gravities"] == list(gs)

"""Lambda returns, weights and return normalisation against naive Python references."""
import numpy as np
import pytest

from dali_jax.models import behavior as B


def _naive_lambda(reward, cont, value, gamma, lam):
    H = reward.shape[0] - 1
    out = np.zeros((H,) + reward.shape[1:])
    nxt = value[H]
    for t in reversed(range(H)):
        nxt = reward[t + 1] + gamma * cont[t + 1] * ((1 - lam) * value[t + 1] + lam * nxt)
        out[t] = nxt
    return out


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_lambda_returns_match_python_loop(lam):
    rng = np.random.default_rng(0)
    H, N = 15, 7
    reward = rng.normal(size=(H + 1, N)).astype(np.float32)
    cont = (rng.uniform(size=(H + 1, N)) > 0.2).astype(np.float32)
    value = rng.normal(size=(H + 1, N)).astype(np.float32)
    gamma = 1 - 1 / 333
    got = np.asarray(B.lambda_returns(reward, cont, value, gamma, lam))
    np.testing.assert_allclose(got, _naive_lambda(reward, cont, value, gamma, lam), rtol=1e-5,
                               atol=1e-5)
    if lam == 0.0:  # one-step TD targets
        np.testing.assert_allclose(got, reward[1:] + gamma * cont[1:] * value[1:], rtol=1e-5)


def test_trajectory_weight_hand_values():
    cont = np.array([[1.0], [1.0], [0.0], [1.0]], np.float32)
    g = 0.5
    w = np.asarray(B.trajectory_weight(cont, g))[:, 0]
    np.testing.assert_allclose(w, [1.0, 0.5, 0.0, 0.0])


def test_return_normalisation_ema_against_numpy_loop():
    rng = np.random.default_rng(3)
    state = dict(lo=np.float32(0), hi=np.float32(0))
    lo = hi = 0.0
    for i in range(20):
        r = rng.normal(loc=i, scale=5.0, size=(15, 64)).astype(np.float32)
        state, scale = B.retnorm_update(state, r, decay=0.99)
        lo = 0.99 * lo + 0.01 * np.percentile(r, 5)
        hi = 0.99 * hi + 0.01 * np.percentile(r, 95)
        assert float(state["lo"]) == pytest.approx(lo, rel=1e-4, abs=1e-5)
        assert float(state["hi"]) == pytest.approx(hi, rel=1e-4, abs=1e-5)
        assert float(scale) == pytest.approx(max(1.0, hi - lo), rel=1e-4)
        if i == 0:  # the EMA starts at 0, so the first scale is clamped to 1
            assert float(scale) == 1.0
    assert float(scale) > 1.0
    big = dict(lo=np.float32(-10), hi=np.float32(30))
    _, s = B.retnorm_update(big, np.zeros((4, 4), np.float32), decay=0.99)
    assert float(s) == pytest.approx(0.99 * 40, rel=1e-5)

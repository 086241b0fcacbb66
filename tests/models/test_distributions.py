"""Dreamer's hand-written distributions against numpy / scipy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dali_jax.models import distributions as D
from dali_jax.models import rssm as R


def test_symlog_symexp_inverse_and_values():
    x = np.array([-1e4, -20.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 1e4], np.float32)
    np.testing.assert_allclose(D.symexp(D.symlog(x)), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D.symlog(x), np.sign(x) * np.log1p(np.abs(x)), rtol=1e-6)
    assert float(D.symlog(jnp.float32(np.e - 1))) == pytest.approx(1.0, abs=1e-6)


def test_twohot_round_trip_and_weights():
    bins = D.twohot_bins(255)
    assert float(bins[0]) == -20 and float(bins[-1]) == 20 and bins.shape == (255,)
    y = np.array([-19.99, -3.3, -0.07, 0.0, 0.05, 1.7, 19.5], np.float32)
    enc = np.asarray(D.twohot_encode(y, bins))
    np.testing.assert_allclose(enc.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(enc @ np.asarray(bins), y, atol=1e-5)
    assert ((enc > 0).sum(-1) <= 2).all()
    # hand-computed: step = 40/254; y = step/4 -> 3/4 on bin 127 (0.0), 1/4 on bin 128.
    step = 40.0 / 254
    e = np.asarray(D.twohot_encode(jnp.float32(step / 4), bins))
    assert e[127] == pytest.approx(0.75, abs=1e-4) and e[128] == pytest.approx(0.25, abs=1e-4)
    # out of range -> edge bin
    e = np.asarray(D.twohot_encode(jnp.array([50.0, -50.0]), bins))
    assert e[0, -1] == 1.0 and e[1, 0] == 1.0


def test_twohot_log_prob_and_mean_in_real_space():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 255)).astype(np.float32)
    y = np.array([2.0, -7.0, 300.0], np.float32)
    dist = D.TwoHot(jnp.asarray(logits))
    target = np.asarray(D.twohot_encode(D.symlog(y), D.twohot_bins()))
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(dist.log_prob(y), (target * logsm).sum(-1), rtol=1e-5)
    probs = np.exp(logsm)
    want = np.sign(probs @ np.linspace(-20, 20, 255)) * np.expm1(np.abs(probs @ np.linspace(-20, 20, 255)))
    np.testing.assert_allclose(dist.mean(), want, rtol=1e-4)
    # A peaked two-hot distribution decodes back to the value it encodes.
    peaked = D.TwoHot(jnp.log(jnp.asarray(target) + 1e-12))
    np.testing.assert_allclose(peaked.mean(), y, rtol=1e-3)


def _np_unimix(logits, mix=0.01):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (1 - mix) * p + mix / logits.shape[-1]


def test_kl_with_unimix_and_free_bits_against_numpy():
    rng = np.random.default_rng(1)
    lp = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 3
    lq = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 3
    lq[0] = lp[0] + 0.2 * rng.normal(size=(3, 4, 5))  # close distributions: KL < 1
    post = dict(logit=D.unimix_logits(jnp.asarray(lp)))
    prior = dict(logit=D.unimix_logits(jnp.asarray(lq)))
    p, q = _np_unimix(lp), _np_unimix(lq)
    kl = np.array([[sum(stats.entropy(p[b, t, s], q[b, t, s]) for s in range(4))
                    for t in range(3)] for b in range(2)])
    dyn, rep, raw = R.kl_losses(post, prior, free=1.0)
    np.testing.assert_allclose(raw, kl, rtol=1e-4)
    np.testing.assert_allclose(dyn, np.maximum(kl, 1.0), rtol=1e-4)
    np.testing.assert_allclose(rep, np.maximum(kl, 1.0), rtol=1e-4)
    assert (kl < 1).any() and (kl > 1).any()  # both branches of the free bits exercised
    # unimix keeps every class probability >= 1% / K
    assert np.exp(np.asarray(post["logit"])).min() >= 0.01 / 5 - 1e-7


def test_onehot_straight_through_sample_and_entropy():
    logits = D.unimix_logits(jnp.array([[2.0, 0.0, -1.0]]))
    dist = D.OneHot(logits)
    s = dist.sample(jax.random.PRNGKey(0))
    assert s.shape == (1, 3) and float(s.sum()) == pytest.approx(1.0, abs=1e-6)
    assert set(np.round(np.asarray(s), 6).ravel()) <= {0.0, 1.0}
    # gradient of a sample flows through the probabilities (straight-through)
    g = jax.grad(lambda l: (D.OneHot(l).sample(jax.random.PRNGKey(0)) * jnp.arange(3.0)).sum())(
        jnp.array([[2.0, 0.0, -1.0]]))
    assert np.abs(np.asarray(g)).sum() > 0
    p = np.exp(np.asarray(logits))
    assert float(dist.entropy()[0]) == pytest.approx(stats.entropy(p[0]), rel=1e-5)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    freq = np.asarray(jax.vmap(lambda k: dist.sample(k))(keys)).mean(0)[0]
    np.testing.assert_allclose(freq, p[0], atol=0.03)


def test_onehot_sample_frequencies_chi_square():
    """Inverse-CDF sampling draws each class with its probability (chi-square against the
    probabilities, 20k draws of 3 different categoricals), exactly one-hot, never a
    zero-probability class."""
    logits = jnp.log(jnp.array([[0.5, 0.0, 0.3, 0.2], [0.01, 0.01, 0.01, 0.97],
                                [0.25, 0.25, 0.25, 0.25]]))
    dist = D.OneHot(logits)
    keys = jax.random.split(jax.random.PRNGKey(3), 20000)
    s = np.asarray(jax.vmap(dist.sample)(keys))  # (20000, 3, 4)
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
    counts = s.round().sum(0)
    assert counts[0, 1] == 0
    p = np.exp(np.asarray(dist.logits))
    for row in range(3):
        keep = p[row] > 0
        _, pval = stats.chisquare(counts[row, keep], 20000 * p[row, keep] / p[row, keep].sum())
        assert pval > 1e-3, (row, counts[row], pval)


def test_bernoulli_and_bounded_normal_against_scipy():
    logits = jnp.array([-2.0, 0.3, 4.0])
    b = D.Bernoulli(logits)
    pr = 1 / (1 + np.exp(-np.asarray(logits)))
    np.testing.assert_allclose(b.log_prob(jnp.array([1.0, 0.0, 1.0])),
                               np.log([pr[0], 1 - pr[1], pr[2]]), rtol=1e-5)
    np.testing.assert_allclose(b.entropy(), stats.bernoulli(pr).entropy(), rtol=1e-5)
    np.testing.assert_array_equal(b.mode(), [0.0, 1.0, 1.0])
    raw_mu, raw_std = jnp.array([[0.5, -3.0]]), jnp.array([[0.0, -10.0]])
    std = D.bounded_std(raw_std)
    np.testing.assert_allclose(std, 0.9 / (1 + np.exp(-(np.asarray(raw_std) + 2))) + 0.1,
                               rtol=1e-6)
    n = D.BoundedNormal(jnp.tanh(raw_mu), std)
    x = jnp.array([[0.1, 0.2]])
    ref = stats.norm(np.tanh(np.asarray(raw_mu)), np.asarray(std))
    np.testing.assert_allclose(n.log_prob(x), ref.logpdf(np.asarray(x)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(n.entropy(), ref.entropy().sum(-1), rtol=1e-5)
    assert float(std.min()) >= 0.1 and float(std.max()) <= 1.0


def test_onehot_normalized_flag_matches_renormalising():
    """Skipping log_softmax on unimix log-probabilities changes neither values nor the
    gradient with respect to the raw logits."""
    raw = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 8)) * 3.0
    target = jax.nn.one_hot(jnp.arange(20).reshape(5, 4) % 8, 8)
    other = D.unimix_logits(jax.random.normal(jax.random.PRNGKey(4), (5, 4, 8)))

    def stats(raw, normalized):
        d = D.OneHot(D.unimix_logits(raw), 1, normalized=normalized)
        o = D.OneHot(other, 1, normalized=normalized)
        s = d.sample(jax.random.PRNGKey(5))
        return (d.log_prob(target).sum() + 0.3 * d.entropy().sum() + 0.7 * d.kl(o).sum()
                + jnp.sum(s * jnp.arange(8.0)))

    a = jax.value_and_grad(stats)(raw, False)
    b = jax.value_and_grad(stats)(raw, True)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)

"""nets and fastgrad: the hand-written LayerNorm + activation gradient, the deferred kernel
gradients and the routed forward equal autodiff; the matmul convolutions equal XLA's."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dali_jax.models import fastgrad, nets


def _reference(x, scale, bias, eps, act):
    """LayerNorm + activation written out plainly and differentiated by JAX."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    z = (x - mean) / jnp.sqrt(var + eps) * scale + bias
    return {"none": z, "silu": z * jax.nn.sigmoid(z), "tanh": jnp.tanh(z)}[act]


@pytest.mark.parametrize("act", ["none", "silu", "tanh"])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 4, 8)])
def test_layer_norm_value_and_gradient_match_autodiff(act, shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 3.0 * jax.random.normal(ks[0], shape) + 1.0
    scale = 1.0 + 0.3 * jax.random.normal(ks[1], shape[-1:])
    bias = 0.2 * jax.random.normal(ks[2], shape[-1:])
    w = jax.random.normal(ks[3], shape)  # a non-trivial cotangent

    def loss(fn):
        return lambda x, s, b: jnp.sum(w * jnp.sin(fn(x, s, b)))

    ours = lambda x, s, b: fastgrad.layer_norm(x, s, b, 1e-3, act)
    ref = lambda x, s, b: _reference(x, s, b, 1e-3, act)
    chex.assert_trees_all_close(ours(x, scale, bias), ref(x, scale, bias), atol=1e-5)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, scale, bias)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(x, scale, bias)
    chex.assert_trees_all_close(g_ours, g_ref, atol=2e-5, rtol=2e-5)


def test_layer_norm_keeps_input_dtype_and_dense_params():
    x = jnp.ones((3, 5), jnp.bfloat16) * jnp.arange(5, dtype=jnp.bfloat16)
    out = fastgrad.layer_norm(x, jnp.ones(5), jnp.zeros(5), act="silu")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(_reference(x, 1.0, 0.0, 1e-3, "silu")), atol=2e-2)
    # The fused norm + activation keeps Dense's parameter tree (kernel, norm/scale, norm/bias).
    params = nets.Dense(4).init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "kernel": (3, 4), "norm": {"scale": (4,), "bias": (4,)}}


# ------------------------------------------------------------------ image convolutions

@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (3, 8, 8, 64), (2, 4, 4, 256), (1, 6, 10, 5)])
@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_convolutions_equal_xla_values_and_gradients(shape, transpose):
    """The space-to-depth / im2col rewrite equals lax.conv_general_dilated / lax.conv_transpose
    (4x4, stride 2, SAME: the image networks' only convolutions) in values and in the
    gradients with respect to input and kernel."""
    from jax import lax

    from dali_jax.models import conv as CV
    rng = np.random.default_rng(sum(shape) + transpose)
    O = 7
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 4, shape[-1], O)) / np.sqrt(16 * shape[-1]),
                    jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    if transpose:
        ref = lambda x, w: lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=dn)
        ours = lambda x, w: CV.conv_transpose(x, w, "matmul")
    else:
        ref = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                                    dimension_numbers=dn)
        ours = lambda x, w: CV.conv(x, w, "matmul")
    y_ref, y = ref(x, w), ours(x, w)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    g_ref = jax.grad(lambda x, w: (ref(x, w) * cot).sum(), (0, 1))(x, w)
    g = jax.grad(lambda x, w: (ours(x, w) * cot).sum(), (0, 1))(x, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_conv_impl_selection_and_errors():
    from dali_jax.models import conv as CV
    assert CV.resolve("native") == "native" and CV.resolve("matmul") == "matmul"
    assert CV.resolve("auto") == ("matmul" if jax.default_backend() == "cpu" else "native")
    with pytest.raises(ValueError, match="auto, native|'auto', 'native'"):
        CV.resolve("fft")
    with pytest.raises(ValueError, match="even"):
        CV.conv(jnp.zeros((1, 5, 4, 3)), jnp.zeros((4, 4, 3, 2)), "matmul")


def test_image_networks_have_the_same_parameters_and_outputs_under_both_impls():
    """Same parameter tree (names, shapes, init values: checkpoints carry over) and outputs."""
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.integers(0, 256, (3, 64, 64, 3)), jnp.uint8)
    feat = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32)
    enc = {i: nets.ConvEncoder(8, impl=i) for i in ("native", "matmul")}
    dec = {i: nets.ConvDecoder((64, 64, 3), 8, impl=i) for i in ("native", "matmul")}
    pe = {i: enc[i].init(jax.random.PRNGKey(1), img) for i in enc}
    pd = {i: dec[i].init(jax.random.PRNGKey(2), feat) for i in dec}
    chex.assert_trees_all_equal(pe["native"], pe["matmul"])
    chex.assert_trees_all_equal(pd["native"], pd["matmul"])
    assert "bias" in pd["matmul"]["params"]["s3conv"] and "bias" not in pd["matmul"][
        "params"]["s0conv"]
    np.testing.assert_allclose(enc["matmul"].apply(pe["matmul"], img),
                               enc["native"].apply(pe["native"], img), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dec["matmul"].apply(pd["matmul"], feat),
                               dec["native"].apply(pd["native"], feat), rtol=1e-4, atol=1e-4)


class _Cell(nn.Module):
    """h' = silu(LN([h, x] A)) + x B + b: one tapped-able normalised layer, one plain one."""

    @nn.compact
    def __call__(self, h, x):
        return (nets.Dense(4, name="a")(jnp.concatenate([h, x], -1))
                + nets.Dense(4, norm=False, act="none", name="b")(x))


def test_defer_kernels_equals_autodiff_through_the_plain_scan():
    """fastgrad.defer_kernels: with layer `a` tapped, the scan's value and the gradients of
    every parameter (a's kernel summed after the scan), the start state and the inputs
    equal plain autodiff through the same scan; `a` records each step's input."""
    T, B = 5, 3
    cell = _Cell()
    rng = np.random.default_rng(0)
    h0 = jnp.asarray(rng.normal(size=(B, 4)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(T, B, 2)), jnp.float32)
    params = cell.init(jax.random.PRNGKey(0), h0, xs[0])["params"]

    def scan(p, args, taps):
        h, x = args

        def step(h, inp):
            x_t, tap = inp
            h, rec = fastgrad.apply_tapped(cell, p, tap, h, x_t)
            return h, (h, rec)

        _, (hs, inputs) = jax.lax.scan(step, h, (x, taps))
        return hs, inputs

    def plain(p, h, x):
        return jnp.sum(jnp.sin(scan(p, (h, x), None)[0]))

    taps = {"a": {"dy": jax.ShapeDtypeStruct((T, B, 4), jnp.float32)}}

    def deferred(p, h, x):
        return jnp.sum(jnp.sin(fastgrad.defer_kernels(scan, p, (h, x), taps)))

    np.testing.assert_allclose(deferred(params, h0, xs), plain(params, h0, xs), rtol=1e-6)
    g_ref = jax.grad(plain, (0, 1, 2))(params, h0, xs)
    g = jax.jit(jax.grad(deferred, (0, 1, 2)))(params, h0, xs)
    assert float(jnp.abs(g[0]["a"]["kernel"]).max()) > 1e-3
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           g, g_ref)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), taps)
    _, inputs = scan(params, (h0, xs), zeros)
    np.testing.assert_allclose(inputs["a"]["x"][0], jnp.concatenate([h0, xs[0]], -1))


def test_routed_sends_each_copy_to_its_own_input():
    """fastgrad.routed: one forward; the first copy's cotangent reaches only x, the
    second's only the parameters (against jax.grad with stop-gradients)."""
    fn = lambda p, x: jnp.tanh(x @ p)
    p = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)

    def ours(p, x):
        a, b = fastgrad.routed(fn, p, x)
        return jnp.sum(a ** 2) + jnp.sum(jnp.cos(b))

    def ref(p, x):
        sg = jax.lax.stop_gradient
        return jnp.sum(fn(sg(p), x) ** 2) + jnp.sum(jnp.cos(fn(p, sg(x))))

    for got, want in zip(jax.grad(ours, (0, 1))(p, x), jax.grad(ref, (0, 1))(p, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6)

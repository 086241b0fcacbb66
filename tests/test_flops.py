"""count_flops against hand counts: matmuls, MLP forward + backward, scans, convolutions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dali_jax.flops import FlopCountWarning, count_flops

f32 = jnp.float32


def sds(*shape):
    return jax.ShapeDtypeStruct(shape, f32)


def test_single_matmul():
    # (B, M, K) @ (B, K, N) -> 2 * B * M * N * K
    assert count_flops(jnp.matmul, sds(3, 5, 7), sds(3, 7, 11)) == 2 * 3 * 5 * 11 * 7
    assert count_flops(lambda a, b: a @ b, np.ones((4, 6), np.float32),
                       np.ones((6, 9), np.float32)) == 2 * 4 * 9 * 6
    # einsum with two contracted dimensions: K = 6 * 2
    flops = count_flops(lambda a, b: jnp.einsum("bik,ikn->bn", a, b), sds(4, 6, 2), sds(6, 2, 3))
    assert flops == 2 * 4 * 3 * 12


def _mlp_init(dims, key):
    params = []
    for din, dout in zip(dims[:-1], dims[1:]):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (din, dout)), jnp.zeros(dout)))
    return params


def _mlp(params, x):
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i < len(params) - 1:
            x = jax.nn.silu(x)
    return x


def test_mlp_forward_and_backward():
    """Layers d0 -> d1 -> ... -> dL on a batch of B.

    Forward: F = sum_i 2 B d_{i-1} d_i.
    Gradient of a loss w.r.t. the parameters only (x is data, not differentiated):
    - every layer's weight gradient x_{i-1}^T g_i costs 2 B d_{i-1} d_i (all layers: F);
    - every layer's input gradient g_i W_i^T costs 2 B d_i d_{i-1}, except the first
      layer's, which would be the gradient w.r.t. x and is not computed: F - 2 B d0 d1.
    value_and_grad also runs the forward pass once: total = 3 F - 2 B d0 d1.
    """
    B, dims = 16, (24, 64, 48, 10)
    params = _mlp_init(dims, jax.random.PRNGKey(0))
    x = jnp.ones((B, dims[0]))
    fwd = sum(2 * B * a * b for a, b in zip(dims[:-1], dims[1:]))
    assert count_flops(_mlp, params, x) == fwd

    loss = lambda p, x: jnp.mean(_mlp(p, x) ** 2)
    total = count_flops(jax.value_and_grad(loss), params, x)
    assert total == 3 * fwd - 2 * B * dims[0] * dims[1]
    # Differentiating w.r.t. x as well adds the first layer's input gradient: exactly 3 F.
    assert count_flops(jax.value_and_grad(loss, argnums=(0, 1)), params, x) == 3 * fwd


def test_elementwise_flag():
    f = lambda a, b: jnp.exp(a @ b) + 1.0
    a, b = sds(4, 6), sds(6, 5)
    assert count_flops(f, a, b) == 2 * 4 * 5 * 6
    # exp and add: one FLOP per output element each.
    assert count_flops(f, a, b, include_elementwise=True) == 2 * 4 * 5 * 6 + 2 * 4 * 5
    # reduce_sum: one per input element.
    assert count_flops(lambda x: x.sum(), sds(3, 7), include_elementwise=True) == 21


def _matmul_body(c, w):
    return c @ w


def test_scan_counts_every_step():
    x, w = sds(8, 16), sds(16, 16)
    body = count_flops(_matmul_body, x, w)
    assert body == 2 * 8 * 16 * 16

    def scanned(x, w):
        return lax.scan(lambda c, _: (_matmul_body(c, w), None), x, None, length=7)[0]

    assert count_flops(scanned, x, w) == 7 * body
    # fori_loop with static bounds traces to a scan and is counted exactly too.
    assert count_flops(lambda x, w: lax.fori_loop(0, 7, lambda i, c: c @ w, x), x, w) == 7 * body


def test_nested_scan():
    x, w = sds(8, 16), sds(16, 16)
    body = 2 * 8 * 16 * 16

    def inner(c, w):
        return lax.scan(lambda c, _: (c @ w, None), c, None, length=5)[0]

    def outer(x, w):
        def step(c, _):
            c = inner(c, w)
            return c @ w, None  # one more matmul per outer step
        return lax.scan(step, x, None, length=3)[0]

    assert count_flops(outer, x, w) == 3 * (5 * body + body)
    # Under grad the backward scans are counted too: every matmul c @ w gets a weight
    # gradient and an input gradient (the input gradient w.r.t. x is needed here because
    # x is differentiated): 3x the forward.
    loss = lambda x, w: outer(x, w).sum()
    assert count_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * 3 * 6 * body


def test_higher_order_primitives():
    x, w = sds(4, 8), sds(8, 8)
    mm = 2 * 4 * 8 * 8

    @jax.custom_jvp
    def cj(x, w):
        return x @ w

    cj.defjvp(lambda p, t: (cj(*p), t[0] @ p[1] + p[0] @ t[1]))

    @jax.custom_vjp
    def cv(x, w):
        return x @ w

    cv.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def f(x, w):
        y = jax.jit(lambda a: a @ w)(x)               # jit
        y = jax.checkpoint(lambda a: a @ w)(y)        # remat
        y = cj(y, w)                                  # custom_jvp_call
        y = cv(y, w)                                  # custom_vjp_call
        y = lax.cond(y.sum() > 0, lambda a: (a @ w) @ w, lambda a: a @ w, y)  # max branch
        return y

    assert count_flops(f, x, w) == 4 * mm + 2 * mm


def test_while_loop_warns_or_raises():
    f = lambda x, w: lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c @ w, x)
    x, w = sds(4, 8), sds(8, 8)
    with pytest.warns(FlopCountWarning):
        assert count_flops(f, x, w) == 2 * 4 * 8 * 8  # body once: a lower bound
    with pytest.raises(ValueError, match="while"):
        count_flops(f, x, w, on_while="raise")


def _conv(x, k, stride, padding):
    return lax.conv_general_dilated(x, k, stride, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_hand_counts():
    # VALID 3x3, stride 1, 3 -> 5 channels on 2 x 8 x 8: out 6 x 6; every tap is real.
    flops = count_flops(lambda x, k: _conv(x, k, (1, 1), "VALID"), sds(2, 8, 8, 3), sds(3, 3, 3, 5))
    assert flops == 2 * (2 * 6 * 6 * 5) * (3 * 3) * 3
    assert flops == count_flops(lambda x, k: _conv(x, k, (1, 1), "VALID"), sds(2, 8, 8, 3),
                                sds(3, 3, 3, 5), conv_padding=True)

    # SAME 4x4 stride 2 on 8 x 8 (the Dreamer encoder's layer): out 4 x 4, padding (1, 1)
    # per dim. Real taps per dim: outputs 0..3 read input rows 2o - 1 + j, j = 0..3; row -1
    # (o = 0, j = 0) and row 8 (o = 3, j = 3) are padding: 16 - 2 = 14 real taps per dim.
    f = lambda x, k: _conv(x, k, (2, 2), "SAME")
    x, k = sds(1, 8, 8, 4), sds(4, 4, 4, 6)
    assert count_flops(f, x, k) == 2 * 6 * 4 * 14 * 14
    # Textbook convention (padding taps counted): 2 * out elements * kernel size * C_in.
    assert count_flops(f, x, k, conv_padding=True) == 2 * (4 * 4 * 6) * 16 * 4

    # Grouped: feature_group_count 2, C_in 4 -> 6: each output reads C_in / 2 channels.
    g = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", feature_group_count=2,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert count_flops(g, sds(1, 5, 5, 4), sds(3, 3, 2, 6)) == 2 * (3 * 3 * 6) * 9 * 2


def test_transposed_conv_skips_dilation_holes():
    # A stride-2 transposed conv with kernel 4 (VALID): every input pixel scatters its
    # 4 x 4 taps into the 10 x 10 output, so the work is 2 * N * H * W * C_in * 16 * C_out,
    # not 2 * (output elements) * 16 * C_in (which would count the inserted zeros).
    N, H, W, Ci, Co = 2, 4, 4, 3, 5
    f = lambda x, k: lax.conv_transpose(x, k, (2, 2), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert jax.eval_shape(f, sds(N, H, W, Ci), sds(4, 4, Ci, Co)).shape == (N, 10, 10, Co)
    assert count_flops(f, sds(N, H, W, Ci), sds(4, 4, Ci, Co)) == 2 * N * H * W * Ci * 16 * Co


@pytest.mark.parametrize("stride,padding", [((1, 1), "SAME"), ((2, 2), "SAME"),
                                            ((2, 2), "VALID"), ((3, 2), ((1, 2), (0, 1)))])
def test_conv_backward_is_twice_forward(stride, padding):
    """The input gradient (a conv with lhs_dilation = stride) and the kernel gradient (a
    conv with rhs_dilation = stride) each do one multiply-add per forward multiply-add of
    real operands, so forward + both gradients = 3x the forward count."""
    x, k = sds(2, 9, 8, 3), sds(4, 3, 3, 5)
    f = lambda x, k: _conv(x, k, stride, padding)
    fwd = count_flops(f, x, k)
    loss = lambda x, k: jnp.sum(f(x, k) ** 2)
    assert count_flops(jax.value_and_grad(loss, argnums=(0, 1)), x, k) == 3 * fwd


def test_static_arguments_and_kwargs():
    def f(x, w, *, times, name=None):
        for _ in range(times):
            x = x @ w
        return x

    assert count_flops(f, sds(2, 3), sds(3, 3), times=4, name="a") == 4 * 2 * 2 * 3 * 3


def test_agent_train_step_counts_scans():
    """The agent's update traced with abstract inputs; the RSSM scans make the count grow
    with the batch length and the imagination horizon."""
    from tests.helpers import feature_spec, random_batch, tiny_config

    from dali_jax.agent import Agent

    def flops(T, H):
        agent = Agent(tiny_config("dali_d", **{"train.batch_length": T,
                                               "train.imag_horizon": H}), feature_spec())
        key = jax.random.PRNGKey(0)
        state = jax.eval_shape(agent.init, key)
        batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                       random_batch(agent.spec, 4, T))
        return count_flops(agent.update, state, batch, key)

    base = flops(16, 5)
    assert base > 0
    assert flops(32, 5) > 1.9 * base  # world model and imagination both scale with B * T
    assert flops(16, 10) > base

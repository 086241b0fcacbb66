"""The image networks' two convolutions, as native XLA convolutions or as one matmul each.

Both are 4x4 kernels with stride 2 and SAME padding on even-sized NHWC images, the only
convolutions of DreamerV3's image encoder and decoder:

* ``conv(x, w)``: (N, H, W, C) -> (N, H/2, W/2, O), ``w`` (4, 4, C, O); equals
  ``lax.conv_general_dilated(x, w, (2, 2), "SAME")``.
* ``conv_transpose(x, w)``: (N, H, W, C) -> (N, 2H, 2W, O), ``w`` (4, 4, C, O); equals
  ``lax.conv_transpose(x, w, (2, 2), "SAME")`` (Flax's ``nn.ConvTranspose``).

``impl="matmul"`` rewrites them exactly (same sums, reordered) as space-to-depth / im2col
and one matmul, which XLA's CPU backend runs near its matmul rate, where its native strided
and input-dilated convolutions run several times slower. Gradients come from autodiff of
the rewrite. ``impl="native"`` calls the XLA convolutions (what GPUs and TPUs should use);
``resolve(impl)`` maps ``auto`` to ``matmul`` on CPU and ``native`` elsewhere.

The forward conv pads by one pixel on each side, so y[i] = sum_t xp[2i + t] w[t]: grouping
xp into 2-pixel blocks makes that a 2x2 valid convolution over the blocks. The transposed
conv gives even outputs x[i-1] w[0] + x[i] w[2] and odd ones x[i] w[1] + x[i+1] w[3]: with x
padded by one pixel, output phase (a, b) at (i, j) is the 2x2 window of xp at (i + a, j + b)
times w[a::2, b::2], so one matmul over all (H+1)(W+1) windows gives the four phases.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "matmul")


def resolve(impl: str) -> str:
    """'auto' -> 'matmul' on the CPU backend, 'native' on accelerators."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "native"
    return impl


def _check(x, w):
    if x.ndim != 4 or w.shape[:2] != (4, 4) or w.shape[2] != x.shape[-1]:
        raise ValueError(f"expected x (N, H, W, C) and w (4, 4, C, O); got {x.shape}, "
                         f"{w.shape}")


def _windows2(x):
    """All 2x2 windows of x (N, H, W, C), stacked on the channels: (N, H-1, W-1, 4C)."""
    H, W = x.shape[1:3]
    return jnp.concatenate([x[:, u:u + H - 1, v:v + W - 1] for u in (0, 1) for v in (0, 1)],
                           -1)


def conv(x, w, impl: str = "auto"):
    """4x4, stride 2, SAME: (N, H, W, C) x (4, 4, C, O) -> (N, H/2, W/2, O)."""
    _check(x, w)
    if resolve(impl) == "native":
        return lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    N, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"the matmul conv needs even image sizes, got {H}x{W}")
    O = w.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # space-to-depth: block (m, n) holds xp[2m:2m+2, 2n:2n+2] as (2, 2, C)
    s2d = xp.reshape(N, H // 2 + 1, 2, W // 2 + 1, 2, C).transpose(0, 1, 3, 2, 4, 5)
    s2d = s2d.reshape(N, H // 2 + 1, W // 2 + 1, 4 * C)
    # block offset (u, v) takes kernel taps w[2u:2u+2, 2v:2v+2]
    k = w.reshape(2, 2, 2, 2, C, O).transpose(0, 2, 1, 3, 4, 5).reshape(16 * C, O)
    return _windows2(s2d) @ k.astype(x.dtype)


def conv_transpose(x, w, impl: str = "auto"):
    """4x4, stride 2, SAME transposed: (N, H, W, C) x (4, 4, C, O) -> (N, 2H, 2W, O)."""
    _check(x, w)
    if resolve(impl) == "native":
        return lax.conv_transpose(x, w, (2, 2), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    N, H, W, C = x.shape
    O = w.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # phase (a, b) uses taps w[a + 2u, b + 2v] on window offset (u, v)
    k = w.reshape(2, 2, 2, 2, C, O).transpose(0, 2, 1, 3, 4, 5)  # (u, v, a, b, C, O)
    k = k.transpose(0, 1, 4, 2, 3, 5).reshape(4 * C, 4 * O)
    q = (_windows2(xp) @ k.astype(x.dtype)).reshape(N, H + 1, W + 1, 2, 2, O)
    rows = [jnp.stack([q[:, a:a + H, b:b + W, a, b] for b in (0, 1)], 3) for a in (0, 1)]
    y = jnp.stack(rows, 2)  # (N, H, 2, W, 2, O): output (2i + a, 2j + b)
    return y.reshape(N, 2 * H, 2 * W, O)

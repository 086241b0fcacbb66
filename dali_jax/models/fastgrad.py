"""The update's speed tricks, behind four functions; model code uses no other name here.

- `layer_norm`: act(LayerNorm(x)) with a hand-written backward pass (keeps x and two
  per-row statistics instead of autodiff's intermediates and their stacked copies in scans).
- `defer_kernels`: the kernels of chosen `nets.Dense` layers inside a `lax.scan` get their
  gradients after the scan, as one (in x rows) @ (rows x out) matmul each, instead of a
  small matmul plus an accumulation per step. The layers learn of it through Flax variable
  collections ("taps" in, "inputs" out, see `tapped_matmul`), so the model code has no
  tap arguments; `scan_deferring` is the scan a model calls.
- `routed`: one forward pass serving two losses, each differentiated with respect to a
  different input (the critic's logits for the actor's returns and the critic's loss).
- `pair_mse`: the squared error of an MLP head on (step, window) pairs whose input is a
  per-step part and the window's context, and whose target is per step (the alignment
  losses): the per-step parts of the first layer (and, for targets wider than the head,
  of the error) are computed once per step instead of once per pair.

Each is tested equal, in values and gradients, to the plain computation (tests/models/
test_nets.py, test_rssm.py, tests/agent/test_agent.py). Inside `plain_autodiff()` (the
agent enters it with `model.custom_vjp=False`) all four compute plainly, with no custom
VJP, so that `jax.jvp`, `jax.linearize` and Hessians go through the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

f32 = jnp.float32
tmap = jax.tree_util.tree_map


_PLAIN = contextvars.ContextVar("dali_jax_plain_autodiff", default=False)


@contextlib.contextmanager
def plain_autodiff(on: bool = True):
    """While tracing inside it, the functions here use no custom VJP."""
    token = _PLAIN.set(bool(on))
    try:
        yield
    finally:
        _PLAIN.reset(token)


def with_plain_autodiff(fn):
    """fn, traced and run inside `plain_autodiff()`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with plain_autodiff():
            return fn(*args, **kwargs)
    return wrapped


# ------------------------------------------------------------------ LayerNorm + act
_NORM_ACTS = {  # act -> (f(z), f'(z)); the identity's derivative is not multiplied in
    "none": (lambda z: z, None),
    "silu": (jax.nn.silu,
             lambda z: jax.nn.sigmoid(z) * (1.0 + z * (1.0 - jax.nn.sigmoid(z)))),
}


def layer_norm(x, scale, bias, eps: float = 1e-3, act: str = "none"):
    """act(LayerNorm(x) * scale + bias): (..., D), scale and bias (D,) -> (..., D) in x's
    dtype, computed in float32. The backward pass is hand-written for act "none" and
    "silu" and recomputes the normalised x from x and its two row statistics."""
    dtype = x.dtype
    x = x.astype(f32)
    if act in _NORM_ACTS and not _PLAIN.get():
        return _norm_act(x, scale, bias, eps, act).astype(dtype)
    f = _NORM_ACTS[act][0] if act in _NORM_ACTS else getattr(jax.nn, act)
    return f(_norm_affine(x, scale, bias, eps)[0]).astype(dtype)


def _norm_affine(x, scale, bias, eps):
    """-> (LayerNorm(x) * scale + bias, normalised x, mean, 1 / std), all float32."""
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * scale + bias, xhat, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm_act(x, scale, bias, eps, act):
    return _NORM_ACTS[act][0](_norm_affine(x, scale, bias, eps)[0])


def _norm_act_fwd(x, scale, bias, eps, act):
    z, _, mean, rstd = _norm_affine(x, scale, bias, eps)
    return _NORM_ACTS[act][0](z), (x, mean, rstd, scale, bias)


def _norm_act_bwd(eps, act, res, dy):
    x, mean, rstd, scale, bias = res
    xhat = (x - mean) * rstd
    dz = dy if act == "none" else dy * _NORM_ACTS[act][1](xhat * scale + bias)
    rows = tuple(range(x.ndim - 1))
    dscale, dbias = (dz * xhat).sum(rows), dz.sum(rows)
    dxhat = dz * scale
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dscale, dbias


_norm_act.defvjp(_norm_act_fwd, _norm_act_bwd)


# ------------------------------------------------------------ deferred kernel grads
@jax.custom_vjp
def _deferred_matmul(x, kernel, tap):
    """x @ kernel whose kernel gets a zero cotangent; `tap` (zeros (..., O)) receives the
    output's cotangent instead."""
    return x @ kernel


def _deferred_fwd(x, kernel, tap):
    return x @ kernel, kernel


def _deferred_bwd(kernel, dy):
    return dy @ kernel.T, jnp.zeros_like(kernel), dy


_deferred_matmul.defvjp(_deferred_fwd, _deferred_bwd)


def tapped_matmul(module, x, kernel):
    """x @ kernel for a Flax layer `module`. When the layer is given a tap (variable "dy"
    of collection "taps", see `defer_kernels`), it records x in collection "inputs" and
    leaves its kernel's gradient to `defer_kernels`."""
    if not module.has_variable("taps", "dy"):
        return x @ kernel
    module.put_variable("inputs", "x", x)
    return _deferred_matmul(x, kernel, module.get_variable("taps", "dy"))


def apply_tapped(module, params, taps, *args, **kwargs):
    """module.apply with the "taps" collection `taps` (None: a plain apply).
    -> (output, the "inputs" collection or None)."""
    if taps is None:
        return module.apply({"params": params}, *args, **kwargs), None
    out, cols = module.apply({"params": params, "taps": taps}, *args, mutable=["inputs"],
                             **kwargs)
    return out, cols["inputs"]


def defer_kernels(scan, params, args, taps):
    """scan(params, args, taps) -> (out, inputs), differentiable in (params, args), with
    the kernels of the tapped layers' gradients computed after the scan.

    taps: {layer path: {"dy": ShapeDtypeStruct (T, B, out)}}, nested like `params`;
    `scan` passes step t's slice of the zeros built from it as the "taps" collection of
    its module (`apply_tapped`) and returns the stacked "inputs" collection
    ({path: {"x": (T, B, in)}}). The kernel of layer `path` then gets
    sum_{t,b} x^T dy: one float32 matmul per layer. Returns out.
    """
    if _PLAIN.get():
        return scan(params, args, None)[0]

    def zeros():
        return tmap(lambda s: jnp.zeros(s.shape, s.dtype), taps)

    @jax.custom_vjp
    def f(params, args):
        return scan(params, args, None)[0]

    def fwd(params, args):
        (out, inputs), vjp = jax.vjp(scan, params, args, zeros())
        return out, (vjp, inputs)

    def bwd(res, d_out):
        vjp, inputs = res
        d_params, d_args, d_taps = vjp((d_out, tmap(jnp.zeros_like, inputs)))
        flat = traverse_util.flatten_dict(d_params)
        xs, dys = traverse_util.flatten_dict(inputs), traverse_util.flatten_dict(d_taps)
        for path, x in xs.items():  # the kernels' cotangents from inside the scan are zero
            kernel = path[:-1] + ("kernel",)
            flat[kernel] = flat[kernel] + jnp.einsum(
                "...i,...o->io", x, dys[path[:-1] + ("dy",)], preferred_element_type=f32)
        return traverse_util.unflatten_dict(flat), d_args

    f.defvjp(fwd, bwd)
    return f(params, args)


def scan_deferring(module, params, method, layers, carry, xs, consts=()):
    """The scan of ``carry = module.apply(params, carry, *x_t, *consts, method=method)`` over
    time-major xs (a tuple of (T, B, ...) arrays or None) -> the carries (T, B, ...), with
    the kernels of the `nets.Dense` layers named in `layers` (top-level names in params)
    differentiated after the scan (`defer_kernels`)."""
    T, B = next(x for x in xs if x is not None).shape[:2]

    def scan(params, args, taps):
        carry, xs, consts = args

        def step(prev, inp):
            x, tap = inp
            out, inputs = apply_tapped(module, params, tap, prev, *x, *consts, method=method)
            return out, (out, inputs)
        _, (outs, inputs) = jax.lax.scan(step, carry, (xs, taps))
        return outs, inputs

    taps = {k: {"dy": jax.ShapeDtypeStruct((T, B, params[k]["kernel"].shape[1]), module.dtype)}
            for k in layers}
    return defer_kernels(scan, params, (carry, xs, consts), taps)


# ---------------------------------------------------------------------- routing
def routed(fn, params, x):
    """(y, y) with y = fn(params, x) computed once: the first copy's cotangent flows only
    into x, the second's only into params (two losses sharing one forward pass, each
    differentiated with respect to a different input)."""
    if _PLAIN.get():  # two forward passes
        sg = jax.lax.stop_gradient
        return fn(sg(params), x), fn(params, sg(x))

    @jax.custom_vjp
    def route(params, x):
        y = fn(params, x)
        return y, y

    def fwd(params, x):
        y, vjp = jax.vjp(fn, params, x)
        return (y, y), vjp

    def bwd(vjp, cts):
        ct_x, ct_params = cts
        return vjp(ct_params)[0], vjp(ct_x)[1]

    route.defvjp(fwd, bwd)
    return route(params, x)


# ---------------------------------------------------------------------- pair heads
def pair_mse(params, x_step, ctx, src, y_step):
    """mean_d (head([x_step[src], ctx]) - y_step[src])_d^2 for every pair. -> (B, T, P)

    params: a `context.DynamicsHead`'s (hidden layers h0.. with SiLU, then `out`); x_step
    (B, L, Ds) and y_step (B, L, Do): the per-step part of the input and the target;
    ctx (B, T, Cc): the window's context, the input's last Cc entries; src (B, T, P): the
    step of each pair. Exact rewrite of the plain computation (the same sums, regrouped):
    the first layer is x_step W_x + b (per step) + ctx W_c (per window). With the last
    hidden layer h (U wide) and the output layer (W, b), a target wider than U (a pixel
    embedding) is not gathered per pair:
        |h W + b - y|^2 = h (W W') h' + 2 h W b + |b|^2 - 2 (h (W y') + b y) + |y|^2,
    whose y terms are per step (U^2 per pair); a narrower one (features, actions) is, and
    the output is computed as is (U Do per pair). Float32 throughout.
    """
    gather = lambda x: jax.vmap(lambda xb, ib: xb[ib])(x, src)
    n = len(params) - 1
    w0, b0 = params["h0"]["kernel"], params["h0"]["bias"]
    ds = x_step.shape[-1]
    h = gather(x_step.astype(f32) @ w0[:ds] + b0) + (ctx.astype(f32) @ w0[ds:])[:, :, None]
    h = jax.nn.silu(h)
    for i in range(1, n):
        h = jax.nn.silu(h @ params[f"h{i}"]["kernel"] + params[f"h{i}"]["bias"])
    w, b = params["out"]["kernel"], params["out"]["bias"]
    y = y_step.astype(f32)
    units, out = w.shape
    if out <= units:
        return jnp.square(h @ w + (b - gather(y))).mean(-1)
    per_step = jnp.concatenate([y @ w.T, (y @ b)[..., None], (y * y).sum(-1, keepdims=True)],
                               -1)  # (B, L, U + 2): W y', b y, |y|^2
    g = gather(per_step)
    wy, by, yy = g[..., :-2], g[..., -2], g[..., -1]
    sq = (jnp.einsum("...u,uv,...v->...", h, w @ w.T, h) + 2 * h @ (w @ b) + b @ b
          - 2 * ((h * wy).sum(-1) + by) + yy)
    return sq / out

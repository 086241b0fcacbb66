"""FLOP counting by walking a function's jaxpr, with every scan step counted.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop (what `lax.scan` lowers
to) once, so for a Dreamer update, whose RSSM observe (T steps) and imagination (H steps)
are scans, it under-reports the work by a large factor. `count_flops` traces the function
with `jax.make_jaxpr` and counts every equation, recursing into sub-jaxprs:

- `scan`: body x `length` (nested scans multiply);
- `cond` / `switch`: the most expensive branch;
- `while`: the trip count is not known from the jaxpr; by default the body and the
  condition are counted once and a `FlopCountWarning` is issued (`on_while="raise"` raises,
  `on_while="ignore"` counts once silently). `fori_loop` with static bounds and every
  `lax.scan` trace to `scan`, so they are counted exactly;
- every other higher-order primitive (`jit`/`pjit`, `closed_call`, `core_call`,
  `custom_jvp_call`, `custom_vjp_call`, `remat`/`checkpoint`, `shard_map`, ...): the sum of
  the jaxprs in its parameters (custom-derivative rules are not part of the traced program;
  their `call_jaxpr` is).

What is a FLOP here (a multiply and an add are two):

- `dot_general`: 2 * (elements of the output) * (size of the contracted dimensions), i.e.
  2 * batch * M * N * K.
- `conv_general_dilated`: 2 * (output batch) * (output features) * (kernel input features)
  * (number of (output position, kernel tap) pairs that read a real input element), the
  pairs counted per spatial dimension and multiplied. The zeros that `lhs_dilation`
  inserts (transposed convolutions, and the input gradient of strided convolutions) are
  never counted, so a transposed convolution costs what its scatter formulation costs.
  By default taps that fall on the zero padding are not counted either: then the input and
  kernel gradients of any convolution each cost exactly as much as its forward pass. With
  `conv_padding=True` padding taps are counted, which for a convolution without
  `lhs_dilation` gives the textbook 2 * out_elements * kernel_spatial * C_in / groups
  (VALID convolutions have no padding taps, so both modes agree for them).
- With `include_elementwise=True`, also 1 per output element of arithmetic element-wise
  primitives (add, mul, exp, tanh, ...) and 1 per input element of reductions
  (reduce_sum, reduce_max, cumsum, argmax, ...). Data movement (reshape, broadcast,
  transpose, gather, select, concatenate, convert) and comparisons count 0. Off by default,
  so the figure is matrix-multiply and convolution FLOPs.

A function differentiated with `jax.grad` / `value_and_grad` inside the traced function is
counted with its backward pass, as it appears in the jaxpr (recomputation under
`jax.checkpoint` included).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import numpy as np
from jax.extend import core as jcore

__all__ = ["count_flops", "count_jaxpr_flops", "FlopCountWarning"]


class FlopCountWarning(UserWarning):
    """The count is a lower bound (a `while` loop with an unknown trip count)."""


# 1 FLOP per output element.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign",
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt",
    "rsqrt", "cbrt", "pow", "integer_pow", "square", "reciprocal", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "igamma", "igammac", "floor", "ceil", "round", "nextafter",
    "clamp", "conj", "real", "imag", "complex", "is_finite", "polygamma", "zeta",
    "bessel_i0e", "bessel_i1e", "random_gamma_grad", "regularized_incomplete_beta",
})
# 1 FLOP per input element.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
    "cumlogsumexp", "reduce_precision",
})


def _size(aval) -> int:
    shape = getattr(aval, "shape", ())
    return int(math.prod(shape)) if shape else 1


def _is_jaxpr(x) -> bool:
    return isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr))


def _sub_jaxprs(params: dict):
    """Every Jaxpr / ClosedJaxpr among an equation's parameters (also inside tuples/lists)."""
    for value in params.values():
        if _is_jaxpr(value):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                if _is_jaxpr(item):
                    yield item


def _dot_general_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    k = math.prod(lhs_shape[d] for d in lhs_contract) if lhs_contract else 1
    return 2 * _size(eqn.outvars[0].aval) * int(k)


def _taps_1d(in_len, out_len, k, stride, lhs_dil, rhs_dil, pad_lo, count_padding) -> int:
    """Number of (output position, kernel tap) pairs of one spatial dimension that read a
    real input element (not a hole inserted by lhs dilation; padding only if counted)."""
    if out_len <= 0 or k <= 0 or in_len <= 0:
        return 0
    o = np.arange(out_len, dtype=np.int64)[:, None]
    j = np.arange(k, dtype=np.int64)[None, :]
    q = o * stride + j * rhs_dil - pad_lo  # position in the lhs-dilated input
    dil_len = (in_len - 1) * lhs_dil + 1
    inside = (q >= 0) & (q < dil_len)
    real = inside & (q % lhs_dil == 0)
    if count_padding:
        real = real | ~inside
    return int(real.sum())


def _conv_flops(eqn, count_padding: bool) -> int:
    p = eqn.params
    lhs = eqn.invars[0].aval
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    n_spatial = len(lhs_spec) - 2
    strides = p.get("window_strides") or (1,) * n_spatial
    lhs_dil = p.get("lhs_dilation") or (1,) * n_spatial
    rhs_dil = p.get("rhs_dilation") or (1,) * n_spatial
    padding = p.get("padding") or ((0, 0),) * n_spatial
    pairs = 1
    for i in range(n_spatial):
        pairs *= _taps_1d(lhs.shape[lhs_spec[2 + i]], out.shape[out_spec[2 + i]],
                          rhs.shape[rhs_spec[2 + i]], strides[i], lhs_dil[i], rhs_dil[i],
                          padding[i][0], count_padding)
    out_batch = out.shape[out_spec[0]]
    out_feat = out.shape[out_spec[1]]
    kernel_in = rhs.shape[rhs_spec[1]]  # = C_in / feature_group_count
    return 2 * out_batch * out_feat * kernel_in * pairs


def count_jaxpr_flops(jaxpr, *, include_elementwise: bool = False,
                      conv_padding: bool = False, on_while: str = "warn") -> int:
    """FLOPs of a `Jaxpr` or `ClosedJaxpr` (see the module docstring for the rules)."""
    if on_while not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_while must be 'warn', 'raise' or 'ignore'; got {on_while!r}")
    opts = dict(include_elementwise=include_elementwise, conv_padding=conv_padding,
                on_while=on_while)
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn, conv_padding)
        elif name == "scan":
            total += int(eqn.params["length"]) * count_jaxpr_flops(eqn.params["jaxpr"], **opts)
        elif name == "cond":
            total += max((count_jaxpr_flops(b, **opts) for b in eqn.params["branches"]),
                         default=0)
        elif name == "while":
            msg = ("count_flops: a `while` loop has a trip count unknown at trace time; its "
                   "body is counted once, so the figure is a lower bound (use lax.scan or "
                   "fori_loop with static bounds to count exactly)")
            if on_while == "raise":
                raise ValueError(msg)
            if on_while == "warn":
                warnings.warn(msg, FlopCountWarning, stacklevel=2)
            total += count_jaxpr_flops(eqn.params["cond_jaxpr"], **opts)
            total += count_jaxpr_flops(eqn.params["body_jaxpr"], **opts)
        else:
            subs = list(_sub_jaxprs(eqn.params))
            if subs:
                total += sum(count_jaxpr_flops(s, **opts) for s in subs)
            elif include_elementwise:
                if name in _ELEMENTWISE:
                    total += sum(_size(v.aval) for v in eqn.outvars)
                elif name in _REDUCTIONS:
                    total += _size(eqn.invars[0].aval)
    return total


def _is_dynamic(leaf) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def count_flops(fn: Callable, *args, include_elementwise: bool = False,
                conv_padding: bool = False, on_while: str = "warn", dce: bool = True,
                **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)`, every scan step counted.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s (nothing is computed or allocated;
    the function is only traced). Leaves of `args` / `kwargs` without a shape and dtype
    (Python numbers, strings, None, ...) are passed as static values.

    include_elementwise: also count element-wise arithmetic and reductions (default: only
        dot_general and convolutions).
    conv_padding: count convolution taps on zero padding (textbook convention).
    on_while: "warn" (default), "raise" or "ignore" for `while` loops of unknown trip count.
    dce: first drop the equations no output depends on (as XLA does when it compiles);
        e.g. a custom VJP that calls a `jax.vjp` function twice and uses half of each
        result is counted once.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
    dyn = [leaves[i] for i in dyn_idx]

    def wrapped(*dyn_leaves):
        full = list(leaves)
        for i, leaf in zip(dyn_idx, dyn_leaves):
            full[i] = leaf
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **kw)

    closed = jax.make_jaxpr(wrapped)(*dyn)
    if dce:
        from jax._src.interpreters import partial_eval as pe  # no public DCE entry point

        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        closed = jcore.ClosedJaxpr(jaxpr, closed.consts)
    return count_jaxpr_flops(closed, include_elementwise=include_elementwise,
                             conv_padding=conv_padding, on_while=on_while)

"""Flax building blocks of DreamerV3: dense blocks, MLPs, image encoder/decoder, heads.

Conventions (DreamerV3 / the DALI release):
- A normalised dense layer is act(LayerNorm(x @ W)) with no bias; LayerNorm eps 1e-3 in float32.
- Un-normalised layers (outputs) have a bias.
- Weights: truncated normal, std sqrt(scale / fan_avg) / 0.8796; scale 0 gives zeros.
- `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.models import conv as CV
from dali_jax.models import distributions as D

f32 = jnp.float32


def winit(scale: float = 1.0):
    """Truncated-normal fan-avg initialiser (zeros when scale == 0)."""
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, "fan_avg", "truncated_normal")


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (eps 1e-3), then `act`, cast back to the
    input dtype. (..., D) -> (..., D)."""
    eps: float = 1e-3
    act: str = "none"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), f32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), f32)
        return layer_norm(x, scale, bias, self.eps, self.act)


def layer_norm(x, scale, bias, eps: float = 1e-3, act: str = "none"):
    """act(LayerNorm(x)): (..., D) with scale, bias (D,) -> (..., D) in x's dtype.

    Computed in float32. For act "none" and "silu" the gradient is hand-written
    (`_norm_act`): it keeps only x and two per-row statistics for the backward pass and
    recomputes the rest in one pass, instead of the half-dozen intermediates (and, inside
    scans, their stacked copies) that autodiff would keep; tested equal to autodiff.
    """
    dtype = x.dtype
    x = x.astype(f32)
    if act in _NORM_ACTS:
        return _norm_act(x, scale, bias, eps, act).astype(dtype)
    return get_act(act)(_norm_affine(x, scale, bias, eps)[0]).astype(dtype)


def _norm_affine(x, scale, bias, eps):
    """-> (LayerNorm(x) * scale + bias, normalised x, mean, 1 / std), all float32."""
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * scale + bias, xhat, mean, rstd


_NORM_ACTS = {  # act -> (f(z), f'(z)); the identity's derivative is not multiplied in
    "none": (lambda z: z, None),
    "silu": (jax.nn.silu,
             lambda z: jax.nn.sigmoid(z) * (1.0 + z * (1.0 - jax.nn.sigmoid(z)))),
}


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


@jax.custom_vjp
def deferred_matmul(x, kernel, tap):
    """x @ kernel whose backward pass leaves the kernel's gradient to the caller.

    x (..., I), kernel (I, O), tap: zeros (..., O) in the output's dtype. The kernel gets a
    zero cotangent and `tap` receives the output's cotangent. Inside a `lax.scan` whose
    taps are a scanned input, the kernel's gradient is then sum_t x_t^T dy_t over stacked
    inputs and tap cotangents: one large matmul after the loop instead of a small one plus
    an accumulation per step (`deferred_kernel_vjp`).
    """
    return x @ kernel


def _deferred_fwd(x, kernel, tap):
    return x @ kernel, kernel


def _deferred_bwd(kernel, dy):
    return dy @ kernel.T, jnp.zeros_like(kernel), dy


deferred_matmul.defvjp(_deferred_fwd, _deferred_bwd)


def deferred_kernel_vjp(objective, make_taps, add_grads):
    """objective(args, taps) -> (out, inputs) as a function f(args) -> out whose kernel
    gradients are computed after the objective's scans.

    Inside, the kernels enter through `deferred_matmul` with `taps` (zeros from
    `make_taps()`; None when f is not differentiated) and their gradients are zero;
    `inputs` is the pytree of those matmuls' stacked inputs (..., I), shaped like the taps
    but for the last axis. The backward pass sums input x tap cotangent over all leading
    axes, one (I, O) float32 matmul per tap, and `add_grads(d_args, grads)` adds them into
    the cotangent of args. Used by `rssm.observe` and `Agent.behavior_objective`.
    """
    @jax.custom_vjp
    def f(args):
        return objective(args, None)[0]

    def fwd(args):
        (out, inputs), vjp = jax.vjp(objective, args, make_taps())
        return out, (vjp, inputs)

    def bwd(res, d_out):
        vjp, inputs = res
        d_args, d_taps = vjp((d_out, jax.tree_util.tree_map(jnp.zeros_like, inputs)))
        grads = jax.tree_util.tree_map(
            lambda x, dy: jnp.einsum("...i,...o->io", x, dy, preferred_element_type=f32),
            inputs, d_taps)
        return (add_grads(d_args, grads),)

    f.defvjp(fwd, bwd)
    return f


class Dense(nn.Module):
    """y = act(LayerNorm(x W)) when `norm`, else act(x W + b) (act(x W) without `bias`).
    (..., in) -> (..., units).

    tap: optional zeros (..., units); when given, the matmul is a `deferred_matmul`."""
    units: int
    norm: bool = True
    act: str = "silu"
    outscale: float = 1.0
    dtype: jnp.dtype = f32
    bias: bool = True

    @nn.compact
    def __call__(self, x, tap=None):
        kernel = self.param("kernel", winit(self.outscale), (x.shape[-1], self.units), f32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        x = x @ kernel if tap is None else deferred_matmul(x, kernel, tap)
        if self.norm:
            return LayerNorm(act=self.act, name="norm")(x)
        if self.bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.units,),
                               f32).astype(self.dtype)
        return get_act(self.act)(x)


def get_act(name: str):
    if name == "none":
        return lambda x: x
    return getattr(jax.nn, name)


class MLP(nn.Module):
    """`layers` normalised dense layers of `units`. (..., in) -> (..., units).

    taps: optional sequence of one tap per layer (`Dense`); then returns (output, list of
    each layer's input in the compute dtype) for deferred weight gradients."""
    layers: int
    units: int
    act: str = "silu"
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x, taps=None):
        inputs = []
        for i in range(self.layers):
            inputs.append(x.astype(self.dtype))
            x = Dense(self.units, act=self.act, dtype=self.dtype, name=f"h{i}")(
                x, None if taps is None else taps[i])
        return x if taps is None else (x, inputs)


class Conv4x4(nn.Module):
    """4x4 stride-2 SAME convolution (or transposed convolution) with a (4, 4, C, O) kernel
    named like Flax's nn.Conv / nn.ConvTranspose; `impl` as in `conv.resolve`."""
    features: int
    transpose: bool = False
    use_bias: bool = False
    impl: str = "auto"
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", winit(), (4, 4, x.shape[-1], self.features), f32)
        fn = CV.conv_transpose if self.transpose else CV.conv
        x = fn(x.astype(self.dtype), w.astype(self.dtype), self.impl)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,), f32).astype(
                self.dtype)
        return x


class ConvEncoder(nn.Module):
    """64x64 images -> flat features. (N, 64, 64, C) uint8/float -> (N, 4*4*8*depth).

    Stride-2 convs (kernel 4) with depth, 2x, 4x, 8x depth channels, each followed by a
    channel LayerNorm and SiLU; input scaled to [-0.5, 0.5].
    """
    depth: int = 32
    minres: int = 4
    impl: str = "auto"  # conv.IMPLS
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype) / 255.0 - 0.5
        stages = int(np.log2(x.shape[-2]) - np.log2(self.minres))
        depth = self.depth
        for i in range(stages):
            x = Conv4x4(depth, impl=self.impl, dtype=self.dtype, name=f"s{i}conv")(x)
            x = LayerNorm(act="silu", name=f"s{i}norm")(x)
            depth *= 2
        return x.reshape(x.shape[:-3] + (-1,))


class ConvDecoder(nn.Module):
    """Features -> image mean in [0, 1] space (centred at 0.5). (N, F) -> (N, H, W, C).

    Linear -> (minres, minres, 8*depth) -> stride-2 transposed convs (kernel 4) halving
    the depth, LayerNorm + SiLU between them, plain last layer; +0.5 at the end.
    """
    shape: Sequence[int] = (64, 64, 3)
    depth: int = 32
    minres: int = 4
    impl: str = "auto"  # conv.IMPLS
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        stages = int(np.log2(self.shape[-2]) - np.log2(self.minres))
        depth = self.depth * 2 ** (stages - 1)
        x = Dense(self.minres * self.minres * depth, norm=False, act="none",
                  dtype=self.dtype, name="in")(x)
        x = x.reshape(x.shape[:-1] + (self.minres, self.minres, depth))
        for i in range(stages):
            last = i == stages - 1
            depth = self.shape[-1] if last else depth // 2
            x = Conv4x4(depth, transpose=True, use_bias=last, impl=self.impl,
                        dtype=self.dtype, name=f"s{i}conv")(x)
            if not last:
                x = LayerNorm(act="silu", name=f"s{i}norm")(x)
        return x.astype(f32) + 0.5


class Encoder(nn.Module):
    """Dict observation -> embedding (..., E).

    Vector keys are concatenated, symlog'd and fed to an MLP; image keys go through the CNN.
    """
    vector_keys: Sequence[str] = ("obs",)
    image_keys: Sequence[str] = ()
    mlp_layers: int = 5
    mlp_units: int = 1024
    cnn_depth: int = 32
    conv_impl: str = "auto"
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, obs):
        outs = []
        if self.image_keys:
            img = jnp.concatenate([obs[k] for k in self.image_keys], -1)
            batch = img.shape[:-3]
            flat = img.reshape((-1,) + img.shape[-3:])
            feat = ConvEncoder(self.cnn_depth, impl=self.conv_impl, dtype=self.dtype,
                               name="cnn")(flat)
            outs.append(feat.reshape(batch + feat.shape[-1:]))
        if self.vector_keys:
            vec = jnp.concatenate([obs[k].astype(f32) for k in self.vector_keys], -1)
            outs.append(MLP(self.mlp_layers, self.mlp_units, dtype=self.dtype,
                            name="mlp")(D.symlog(vec)))
        return jnp.concatenate([o.astype(f32) for o in outs], -1)


class Decoder(nn.Module):
    """Features (..., F) -> dict of predictions: vectors in symlog space, images in [0,1]."""
    vector_shapes: dict = None  # key -> dim
    image_shapes: dict = None  # key -> (H, W, C)
    mlp_layers: int = 5
    mlp_units: int = 1024
    cnn_depth: int = 32
    conv_impl: str = "auto"
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, feat):
        out = {}
        if self.image_shapes:
            keys = list(self.image_shapes)
            h, w = self.image_shapes[keys[0]][:2]
            channels = [self.image_shapes[k][-1] for k in keys]
            batch = feat.shape[:-1]
            img = ConvDecoder((h, w, sum(channels)), self.cnn_depth, impl=self.conv_impl,
                              dtype=self.dtype, name="cnn")(feat.reshape((-1, feat.shape[-1])))
            img = img.reshape(batch + img.shape[1:])
            for k, part in zip(keys, jnp.split(img, np.cumsum(channels)[:-1], -1)):
                out[k] = part
        if self.vector_shapes:
            x = MLP(self.mlp_layers, self.mlp_units, dtype=self.dtype, name="mlp")(feat)
            for k, dim in self.vector_shapes.items():
                out[k] = Dense(dim, norm=False, act="none", dtype=self.dtype,
                               name=f"out_{k}")(x).astype(f32)
        return out


class Head(nn.Module):
    """MLP + linear output. (..., F) -> (..., out). outscale 0 zero-initialises the output."""
    out: int
    layers: int = 2
    units: int = 512
    outscale: float = 1.0
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x, taps=None):
        """taps: see `MLP` (for its layers); then returns (output, MLP layer inputs)."""
        x = MLP(self.layers, self.units, dtype=self.dtype, name="mlp")(x, taps)
        x, inputs = (x, None) if taps is None else x
        out = Dense(self.out, norm=False, act="none", outscale=self.outscale,
                    dtype=self.dtype, name="out")(x).astype(f32)
        return out if taps is None else (out, inputs)


class Actor(nn.Module):
    """Policy head. (..., F) -> distribution parameters.

    Continuous: (mean, raw_std) each (..., A) from two linear outputs (as in the release);
    discrete: logits (..., A).
    """
    action_dim: int
    discrete: bool = False
    layers: int = 2
    units: int = 512
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x, taps=None):
        """taps: see `MLP` (for its layers); then returns (output, MLP layer inputs)."""
        x = MLP(self.layers, self.units, dtype=self.dtype, name="mlp")(x, taps)
        x, inputs = (x, None) if taps is None else x
        out = Dense(self.action_dim, norm=False, act="none", dtype=self.dtype, name="out")(x)
        if self.discrete:
            out = out.astype(f32)
        else:
            std = Dense(self.action_dim, norm=False, act="none", dtype=self.dtype,
                        name="std")(x)
            out = (out.astype(f32), std.astype(f32))
        return out if taps is None else (out, inputs)


def actor_dist(out, discrete: bool, unimix: float = 0.01, min_std=0.1, max_std=1.0):
    """Actor output -> distribution (OneHot with unimix, or BoundedNormal)."""
    if discrete:
        return D.OneHot(D.unimix_logits(out, unimix), normalized=True)
    mean, raw_std = out
    return D.BoundedNormal(jnp.tanh(mean), D.bounded_std(raw_std, min_std, max_std))

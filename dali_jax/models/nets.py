"""Flax building blocks of DreamerV3: dense blocks, MLPs, image encoder/decoder, heads.

Conventions (DreamerV3 / the DALI release):
- A normalised dense layer is act(LayerNorm(x @ W)) with no bias; LayerNorm eps 1e-3 in float32.
- Un-normalised layers (outputs) have a bias.
- Weights: truncated normal, std sqrt(scale / fan_avg) / 0.8796; scale 0 gives zeros.
- `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.models import conv as CV
from dali_jax.models import distributions as D
from dali_jax.models import fastgrad as FG

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
        return FG.layer_norm(x, scale, bias, self.eps, self.act)


class Dense(nn.Module):
    """y = act(LayerNorm(x W)) when `norm`, else act(x W + b) (act(x W) without `bias`).
    (..., in) -> (..., units). (`fastgrad.defer_kernels` may defer W's gradient.)"""
    units: int
    norm: bool = True
    act: str = "silu"
    outscale: float = 1.0
    dtype: jnp.dtype = f32
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", winit(self.outscale), (x.shape[-1], self.units), f32)
        x = FG.tapped_matmul(self, x.astype(self.dtype), kernel.astype(self.dtype))
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
    """`layers` normalised dense layers of `units`. (..., in) -> (..., units)."""
    layers: int
    units: int
    act: str = "silu"
    dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Dense(self.units, act=self.act, dtype=self.dtype, name=f"h{i}")(x)
        return x


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
    def __call__(self, x):
        x = MLP(self.layers, self.units, dtype=self.dtype, name="mlp")(x)
        out = Dense(self.out, norm=False, act="none", outscale=self.outscale,
                    dtype=self.dtype, name="out")(x).astype(f32)
        return out


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
    def __call__(self, x):
        x = MLP(self.layers, self.units, dtype=self.dtype, name="mlp")(x)
        out = Dense(self.action_dim, norm=False, act="none", dtype=self.dtype, name="out")(x)
        if self.discrete:
            out = out.astype(f32)
        else:
            std = Dense(self.action_dim, norm=False, act="none", dtype=self.dtype,
                        name="std")(x)
            out = (out.astype(f32), std.astype(f32))
        return out


def actor_dist(out, discrete: bool, unimix: float = 0.01, min_std=0.1, max_std=1.0):
    """Actor output -> distribution (OneHot with unimix, or BoundedNormal)."""
    if discrete:
        return D.OneHot(D.unimix_logits(out, unimix), normalized=True)
    mean, raw_std = out
    return D.BoundedNormal(jnp.tanh(mean), D.bounded_std(raw_std, min_std, max_std))

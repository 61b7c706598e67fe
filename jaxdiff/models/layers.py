"""Building blocks shared by the UNet and the VAE; param names mirror diffusers' modules."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxdiff import sharding as sh
from jaxdiff.models.attention import dot_product_attention

Dtype = Any
_part = nn.with_logical_partitioning


def dense(
    features: int,
    axes=(sh.EMBED, sh.MLP),
    *,
    use_bias=True,
    kernel_scale=1.0,
    name=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nn.Dense:
    """``kernel_scale``: the std of LeCun-normal init times this (0: a zero kernel)."""
    kernel_init = (
        nn.initializers.zeros_init()
        if kernel_scale == 0
        else nn.initializers.variance_scaling(kernel_scale**2, "fan_in", "truncated_normal")
    )
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=_part(kernel_init, axes),
        bias_init=_part(nn.initializers.zeros_init(), (axes[-1],)),
    )


def conv(
    features: int,
    kernel: int = 3,
    *,
    stride: int = 1,
    padding: int | tuple = 1,
    name=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nn.Conv:
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=_part(nn.initializers.lecun_normal(), (sh.CONV_H, sh.CONV_W, sh.EMBED, sh.MLP)),
        bias_init=_part(nn.initializers.zeros_init(), (sh.MLP,)),
    )


def group_norm(groups: int, eps: float, *, name=None, dtype=jnp.float32, param_dtype=jnp.float32):
    # Two-pass variance: the fast E[x^2]-E[x]^2 form costs parity with PyTorch.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=_part(nn.initializers.ones_init(), (sh.NORM,)),
        bias_init=_part(nn.initializers.zeros_init(), (sh.NORM,)),
    )


def layer_norm(eps: float = 1e-5, *, name=None, dtype=jnp.float32, param_dtype=jnp.float32):
    return nn.LayerNorm(
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=_part(nn.initializers.ones_init(), (sh.NORM,)),
        bias_init=_part(nn.initializers.zeros_init(), (sh.NORM,)),
    )


def constrain(x, *names):
    """Logical sharding constraint on an activation (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, names)


class Attention(nn.Module):
    """diffusers' ``Attention``: to_q/to_k/to_v, to_out.0, optional group_norm and residual (VAE)."""

    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    group_norm_groups: int | None = None  # VAE mid-block attention: GroupNorm in, residual out
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual, spatial = x, x.shape
        if self.group_norm_groups is not None:
            x = group_norm(self.group_norm_groups, self.norm_eps, name="group_norm", **kw)(x)
        if x.ndim == 4:  # [B, H, W, C] -> [B, HW, C]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        context = x if context is None else context
        width = x.shape[-1]
        inner = self.heads * self.head_dim
        q = dense(inner, (sh.EMBED, sh.HEADS), use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = dense(inner, (sh.EMBED, sh.HEADS), use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = dense(inner, (sh.EMBED, sh.HEADS), use_bias=self.qkv_bias, name="to_v", **kw)(context)
        split = lambda t: t.reshape(
            t.shape[0], t.shape[1], self.heads, self.head_dim
        )  # [B, T, N, H]
        out = dot_product_attention(split(q), split(k), split(v), upcast=self.upcast)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = dense(width, (sh.HEADS, sh.EMBED), name="to_out_0", **kw)(out)
        if self.group_norm_groups is not None:
            out = out.reshape(spatial) + residual
        return out


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, an optional time-embedding bias, a 1x1 shortcut when widths differ."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):  # x: [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, name="conv1", **kw)(h)
        if temb is not None:
            h = (
                h
                + dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[
                    :, None, None, :
                ]
            )
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return constrain(x + h, sh.BATCH, sh.HEIGHT, sh.WIDTH, sh.EMBED)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding=0`` is the VAE's variant (pad right/bottom by one first)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = self.padding if self.padding else ((0, 1), (0, 1))
        return conv(
            self.channels,
            stride=2,
            padding=pad,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


def nearest_resize(x, size):
    """PyTorch's ``F.interpolate(mode='nearest')``: source index floor(i * in / out) per axis."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out != n:
            idx = jnp.floor(jnp.arange(out, dtype=jnp.float32) * (n / out)).astype(jnp.int32)
            x = jnp.take(x, jnp.minimum(idx, n - 1), axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to an explicit size, for odd skip shapes) then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        b, h, w, c = x.shape
        if size is None or tuple(size) == (2 * h, 2 * w):
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
                b, 2 * h, 2 * w, c
            )
        else:
            x = nearest_resize(x, size)
        return conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def timestep_embedding(
    t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
):
    """Sinusoidal embedding of (possibly fractional) timesteps t: [B] -> [B, dim], float32."""
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, as diffusers names them."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.features, name="linear_1", **kw)(x))
        return dense(self.features, (sh.MLP, sh.EMBED), name="linear_2", **kw)(x)

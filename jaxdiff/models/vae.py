"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``), NHWC."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this before diffusion
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS = {
    "tiny": VAEConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32
    ),
    # the shapes world: 64 px -> 16 x 16 x 4 latents (configs/shapes_sd/vae.py)
    "shapes": VAEConfig(
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64
    ),
    "sd15": VAEConfig(),
    "sd21": VAEConfig(sample_size=768),
    "sdxl": VAEConfig(scaling_factor=0.13025, sample_size=1024),
}


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar))."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 sum(mu^2 + s^2 - 1 - log s^2), per example
        return 0.5 * jnp.sum(
            self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3)
        )


jax.tree_util.register_dataclass(DiagonalGaussian, data_fields=["mean", "logvar"], meta_fields=[])


class _Mid(nn.Module):
    channels: int
    groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_0", **kw)(x)
        if self.attention:
            x = Attention(
                1,
                self.channels,
                qkv_bias=True,
                group_norm_groups=self.groups,
                name="attentions_0",
                **kw,
            )(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_1", **kw)(x)


class _Block(nn.Module):
    channels: int
    num_resnets: int
    groups: int
    resample: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_resnets):
            x = ResnetBlock2D(self.channels, self.groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2 * latent]
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = _Block(
                ch,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                "down" if i < n - 1 else None,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        x = _Mid(
            cfg.block_out_channels[-1],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            name="mid_block",
            **kw,
        )(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = cfg.block_out_channels[::-1]
        x = conv(chans[0], name="conv_in", **kw)(z)
        x = _Mid(
            chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw
        )(x)
        for i, ch in enumerate(chans):
            x = _Block(
                ch,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                "up" if i < len(chans) - 1 else None,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """encode: images [B, H, W, 3] in [-1, 1] -> DiagonalGaussian; decode: latents -> images.

    Latents here are unscaled; multiply by ``config.scaling_factor`` (after subtracting
    ``shift_factor``) before diffusion, as diffusers' pipelines do (``scale_latents``).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, padding=0, **kw)

    def encode(self, x) -> DiagonalGaussian:
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key=None):
        post = self.encode(x)
        z = post.mode() if key is None else post.sample(key)
        return self.decode(z), post


def scale_latents(z, config: VAEConfig):
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z, config: VAEConfig):
    return z / config.scaling_factor + (config.shift_factor or 0.0)

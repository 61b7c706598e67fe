"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``), NHWC, with cross-attention to text."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxdiff import sharding as sh
from jaxdiff.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    constrain,
    conv,
    dense,
    group_norm,
    layer_norm,
    timestep_embedding,
)

Dtype = Any
_part = nn.with_logical_partitioning
CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (
        8,
        8,
        8,
        8,
    )  # per down block (diffusers' attention_head_dim)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    mid_block: bool = True
    # an embedding added to the time embedding: SDXL's micro-conditioning ("text_time": time ids and the
    # pooled text embedding, given in added_cond), or DeepFloyd IF's "text" (TextTimeEmbedding: the text
    # states attention-pooled, with addition_embed_type_num_heads heads, as GLIDE and Imagen add a pooled
    # text vector), which reads the context and needs no added_cond
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64
    # jaxdiff's extension, not in diffusers: F > 0 adds a learned linear map of the pixel's (row, column) in
    # Fourier features (F octaves, sin and cos) to conv_in's output, so that the UNet knows where it is
    # even when its input is pure noise (CoordConv; a convolution sees position only through its padding)
    position_embedding: int = 0

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field in (
            "down_block_types",
            "up_block_types",
            "num_attention_heads",
            "transformer_layers_per_block",
        ):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"UNetConfig.{field} has {len(getattr(self, field))} entries, "
                    f"block_out_channels has {n}"
                )
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % h:
                raise ValueError(f"UNetConfig: {c} channels do not split into {h} attention heads")
        if self.position_embedding < 0:
            raise ValueError(
                f"UNetConfig.position_embedding must be >= 0 octaves, got {self.position_embedding}"
            )
        if self.addition_embed_type not in (None, "text_time", "text"):
            raise ValueError(
                f"UNetConfig.addition_embed_type must be None, 'text_time' or 'text', "
                f"got {self.addition_embed_type!r}"
            )
        if self.addition_embed_type == "text" and (
            self.addition_embed_type_num_heads < 1
            or self.cross_attention_dim % self.addition_embed_type_num_heads
        ):
            raise ValueError(
                f"UNetConfig.addition_embed_type_num_heads: cross_attention_dim "
                f"{self.cross_attention_dim} does not split into {self.addition_embed_type_num_heads} heads"
            )
        bad = set(self.down_block_types) - {CROSS_DOWN, DOWN} | set(self.up_block_types) - {
            CROSS_UP,
            UP,
        }
        if bad:
            raise ValueError(f"UNetConfig: unsupported block types {sorted(bad)}")


PRESETS = {
    "tiny": UNetConfig(
        block_out_channels=(32, 64),
        down_block_types=(CROSS_DOWN, DOWN),
        up_block_types=(UP, CROSS_UP),
        layers_per_block=1,
        num_attention_heads=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    ),
    # the shapes world: 16 x 16 x 4 latents of the `shapes` VAE, the shapes CLIP's 128-wide text states.
    # No attention at 16 x 16: there it cost half of a training step on the CPU (measured), while 8 x 8
    # already resolves the 3 x 3 position grid (SDXL makes the same cut at its highest resolution)
    "shapes": UNetConfig(
        block_out_channels=(48, 96, 192),
        down_block_types=(DOWN, CROSS_DOWN, CROSS_DOWN),
        up_block_types=(CROSS_UP, CROSS_UP, UP),
        layers_per_block=1,
        num_attention_heads=(4, 4, 8),
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=128,
        norm_num_groups=8,
        sample_size=16,
    ),
    "sd15": UNetConfig(),
    "sd21": UNetConfig(
        num_attention_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    "sdxl": UNetConfig(
        block_out_channels=(320, 640, 1280),
        down_block_types=(DOWN, CROSS_DOWN, CROSS_DOWN),
        up_block_types=(CROSS_UP, CROSS_UP, UP),
        num_attention_heads=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
}


class FeedForward(nn.Module):
    """GEGLU: net.0.proj maps to 2 x 4C, its second half gates the first through an exact GELU; net.2 back."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        h, gate = jnp.split(_Proj(8 * width, name="net_0", **kw)(x), 2, axis=-1)
        return dense(width, (sh.MLP, sh.EMBED), name="net_2", **kw)(
            h * nn.gelu(gate, approximate=False)
        )


class _Proj(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; pre-LayerNorm residuals."""

    heads: int
    head_dim: int
    upcast: bool = False
    only_cross: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # x: [B, T, C], context: [B, S, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(
            self.heads, self.head_dim, upcast=self.upcast, name=name, **kw
        )
        h = layer_norm(name="norm1", **kw)(x)
        x = x + attn("attn1")(h, context if self.only_cross else None)
        x = x + attn("attn2")(layer_norm(name="norm2", **kw)(x), context)
        x = x + FeedForward(name="ff", **kw)(layer_norm(name="norm3", **kw)(x))
        return constrain(x, sh.BATCH, sh.LENGTH, sh.EMBED)


class TextTimeEmbedding(nn.Module):
    """diffusers' ``TextTimeEmbedding`` (DeepFloyd IF's text pooling): LayerNorm, attention pooling, Linear to
    the time embedding's width, LayerNorm: [B, S, D] text states -> [B, time_embed_dim]."""

    features: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(name="norm1", **kw)(context)
        x = AttentionPooling(self.heads, name="pool", **kw)(x)
        return layer_norm(name="norm2", **kw)(dense(self.features, name="proj", **kw)(x))


class AttentionPooling(nn.Module):
    """diffusers' ``AttentionPooling``: one query, the mean of the tokens plus a learned vector, attends over
    itself and every token (no padding mask, as in diffusers): [B, S, D] -> [B, D]."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        pos = self.param(
            "positional_embedding",
            _part(nn.initializers.normal(d**-0.5), (None, sh.EMBED)),
            (1, d),
            self.param_dtype,
        )
        cls = jnp.mean(x, axis=1, keepdims=True) + pos.astype(x.dtype)  # [B, 1, D]
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + S, D]
        split = lambda y: y.reshape(b, y.shape[1], self.heads, d // self.heads)  # noqa: E731
        q = split(dense(d, (sh.EMBED, sh.HEADS), name="q_proj", **kw)(cls))
        k = split(dense(d, (sh.EMBED, sh.HEADS), name="k_proj", **kw)(x))
        v = split(dense(d, (sh.EMBED, sh.HEADS), name="v_proj", **kw)(x))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(d // self.heads)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, d)


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel``: GroupNorm, proj_in, transformer blocks, proj_out, residual."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool
    upcast: bool = False
    only_cross: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # x: [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        proj = (
            (lambda name: dense(c, name=name, **kw))
            if self.linear_projection
            else (lambda name: conv(c, 1, padding=0, name=name, **kw))
        )
        h = proj("proj_in")(h).reshape(b, hgt * wid, c)  # a 1x1 conv and a dense agree per pixel
        for i in range(self.layers):
            h = BasicTransformerBlock(
                self.heads,
                c // self.heads,
                self.upcast,
                self.only_cross,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        return proj("proj_out")(h.reshape(b, hgt, wid, c)) + x


class _Stage(nn.Module):
    """One down or up block: resnets (each followed by a transformer in cross-attention blocks), then
    a down- or upsampler. An up block concatenates one skip activation before each resnet."""

    config: UNetConfig
    channels: int
    num_resnets: int
    heads: int | None  # None: no cross-attention in this block
    layers: int = 1  # transformer blocks per Transformer2D
    resample: str | None = None  # "down" | "up" | None
    remat: bool = False  # recompute each resnet / transformer in the backward pass
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips=(), up_size=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        outs = []
        for j in range(self.num_resnets):
            if skips:
                x = jnp.concatenate([x, skips[j]], axis=-1)
            x = resnet(self.channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}", **kw)(
                x, temb
            )
            if self.heads is not None:
                x = _transformer(cfg, self.heads, self.layers, f"attentions_{j}", kw, self.remat)(
                    x, context
                )
            outs.append(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, name="downsamplers_0", **kw)(x)
            outs.append(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x, up_size)
        return x, outs


class _Mid(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels[-1]
        x = ResnetBlock2D(ch, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x, temb)
        # diffusers' UNetMidBlock2DCrossAttn always self-attends first, whatever only_cross_attention says
        x = Transformer2D(
            cfg.num_attention_heads[-1],
            cfg.transformer_layers_per_block[-1],
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            cfg.upcast_attention,
            only_cross=False,
            name="attentions_0",
            **kw,
        )(x, context)
        return ResnetBlock2D(ch, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x, temb)


def position_features(h: int, w: int, octaves: int) -> jnp.ndarray:
    """[1, h, w, 4 * octaves]: sin and cos of 2^k * pi * (row, column), pixel centres in (-1, 1)."""
    rows = (jnp.arange(h) + 0.5) / h * 2 - 1
    cols = (jnp.arange(w) + 0.5) / w * 2 - 1
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1)  # [h, w, 2]
    angles = grid[..., None] * (jnp.pi * 2.0 ** jnp.arange(octaves))  # [h, w, 2, F]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(1, h, w, 4 * octaves)


def _transformer(
    cfg: UNetConfig, heads: int, layers: int, name: str, kw: dict, remat: bool = False
):
    cls = nn.remat(Transformer2D) if remat else Transformer2D
    return cls(
        heads,
        layers,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        cfg.upcast_attention,
        cfg.only_cross_attention,
        name=name,
        **kw,
    )


class UNet(nn.Module):
    """Noise prediction eps(x_t, t, context): sample [B, H, W, C_in] -> [B, H, W, C_out].
    ``remat``: rematerialise every resnet and transformer block in the backward pass (training)."""

    config: UNetConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample, timesteps, context, added_cond: dict | None = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        temb = timestep_embedding(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        ).astype(self.dtype)
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(temb)
        if cfg.addition_embed_type == "text_time":
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError(
                    "this UNet needs added_cond={'text_embeds': [B, D], 'time_ids': [B, 6]}"
                )
            tid = timestep_embedding(
                added_cond["time_ids"].reshape(-1),
                cfg.addition_time_embed_dim,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
            ).reshape(b, -1)
            aug = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), tid], -1)
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(
                aug.astype(self.dtype)
            )
        context = context.astype(self.dtype)
        if cfg.addition_embed_type == "text":
            temb = temb + TextTimeEmbedding(
                cfg.time_embed_dim, cfg.addition_embed_type_num_heads, name="add_embedding", **kw
            )(context)
        n = len(cfg.block_out_channels)

        x = conv(cfg.block_out_channels[0], name="conv_in", **kw)(sample.astype(self.dtype))
        if cfg.position_embedding:
            # not zero-initialised: the map is useful only together with the text (cross-attention), and
            # a zero map would leave those weights no gradient to find it by
            x = x + dense(
                cfg.block_out_channels[0],
                (None, sh.MLP),
                kernel_scale=0.5,
                name="position_embedding",
                **kw,
            )(position_features(x.shape[1], x.shape[2], cfg.position_embedding).astype(self.dtype))
        skips = [x]
        for i, (ch, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
            x, outs = _Stage(
                cfg,
                ch,
                cfg.layers_per_block,
                cfg.num_attention_heads[i] if kind == CROSS_DOWN else None,
                cfg.transformer_layers_per_block[i],
                "down" if i < n - 1 else None,
                self.remat,
                name=f"down_blocks_{i}",
                **kw,
            )(x, temb, context)
            skips += outs
        if cfg.mid_block:
            x = _Mid(cfg, name="mid_block", **kw)(x, temb, context)
        heads_up, layers_up = cfg.num_attention_heads[::-1], cfg.transformer_layers_per_block[::-1]
        for i, (ch, kind) in enumerate(zip(cfg.block_out_channels[::-1], cfg.up_block_types)):
            block_skips = [skips.pop() for _ in range(cfg.layers_per_block + 1)]
            last = i == n - 1
            x, _ = _Stage(
                cfg,
                ch,
                cfg.layers_per_block + 1,
                heads_up[i] if kind == CROSS_UP else None,
                layers_up[i],
                None if last else "up",
                self.remat,
                name=f"up_blocks_{i}",
                **kw,
            )(x, temb, context, block_skips, None if last else skips[-1].shape[1:3])

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, name="conv_out", **kw)(x)


def grow_params(old: dict, fresh: dict) -> tuple[dict, int, int]:
    """A UNet's params with jaxdiff's extensions added, resized or removed, started from a trained one's:
    every leaf of ``fresh`` (an init of the new config) found in ``old`` at the same path with the same
    shape is copied, the rest keep ``fresh``'s init. Returns (params, leaves copied, leaves new)."""
    flat_old = traverse_util.flatten_dict(old)
    out, copied = {}, 0
    for path, leaf in traverse_util.flatten_dict(fresh).items():
        src = flat_old.get(path)
        if src is not None and src.shape == leaf.shape:
            leaf, copied = jnp.asarray(src, leaf.dtype), copied + 1
        out[path] = leaf
    return traverse_util.unflatten_dict(out), copied, len(out) - copied

"""The CLIP text tower (transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff import sharding as sh
from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import constrain, dense, layer_norm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 means the legacy rule: EOS is the largest id (argmax)
    pad_token_id: int = 1
    bos_token_id: int = 49406
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection (text_projection)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TextConfig: hidden_size {self.hidden_size} does not split into "
                f"{self.num_attention_heads} heads"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(
                f"TextConfig: hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}"
            )


PRESETS = {
    "tiny": TextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "sd15": TextConfig(),  # OpenAI CLIP ViT-L/14
    "sd21": TextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
    ),  # OpenCLIP ViT-H, penultimate layer
    "sdxl": TextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    ),  # the 2nd encoder
}


def _act(name):
    return (
        (lambda x: x * jax.nn.sigmoid(1.702 * x))
        if name == "quick_gelu"
        else (lambda x: nn.gelu(x, approximate=False))
    )


class _EncoderLayer(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, n = cfg.hidden_size, cfg.num_attention_heads
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + _SelfAttention(d, n, name="self_attn", **kw)(h, mask)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        x = x + _MLP(cfg, name="mlp", **kw)(h)
        return constrain(x, sh.BATCH, sh.LENGTH, sh.EMBED)


class _SelfAttention(nn.Module):
    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        qkv = [
            dense(self.width, (sh.EMBED, sh.HEADS), name=f"{n}_proj", **kw)(x).reshape(
                b, t, self.heads, -1
            )
            for n in "qkv"
        ]
        out = dot_product_attention(*qkv, mask=mask).reshape(b, t, self.width)
        return dense(self.width, (sh.HEADS, sh.EMBED), name="out_proj", **kw)(out)


class _MLP(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _act(self.config.hidden_act)(dense(self.config.intermediate_size, name="fc1", **kw)(x))
        return dense(self.config.hidden_size, (sh.MLP, sh.EMBED), name="fc2", **kw)(x)


class _Embeddings(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        embed = lambda n, name, axes: nn.Embed(
            n,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        )
        tok = embed(cfg.vocab_size, "token_embedding", (sh.VOCAB, sh.EMBED))(ids)
        pos = embed(cfg.max_position_embeddings, "position_embedding", (sh.LENGTH, sh.EMBED))(
            jnp.arange(ids.shape[1])
        )
        return tok + pos[None]


class Encoder(nn.Module):
    """Pre-LN transformer layers (``layers_N``); every layer's output is returned. The ViT tower shares it."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        hidden = [x]
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(
                self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype
            )(x, mask)
            hidden.append(x)
        return hidden


def eos_index(input_ids, config: TextConfig):
    """[B] position of each prompt's first end token (where CLIP pools)."""
    if config.eos_token_id == 2:  # legacy configs: the EOS token has the largest id
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == config.eos_token_id, axis=-1)


class TextTransformer(nn.Module):
    """token ids [B, T] -> {'last_hidden_state' [B, T, D], 'pooled' [B, D], 'hidden_states'
    (embeddings, then each layer's output), 'text_embeds' (projected pooled, if configured)}.

    SD 1.x conditions on last_hidden_state; clip-skip k (and SD 2's penultimate layer) is
    ``final_layer_norm``-ed ``hidden_states[-1 - k]``: see :func:`clip_skip`.
    """

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = _Embeddings(self.config, **kw)
        self.encoder = Encoder(self.config, **kw)
        self.final_layer_norm = layer_norm(self.config.layer_norm_eps, **kw)
        if self.config.projection_dim:
            self.text_projection = dense(self.config.projection_dim, use_bias=False, **kw)

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(
                f"{t} tokens exceed the text encoder's {cfg.max_position_embeddings} positions"
            )
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # causal: [1, 1, T, T]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]  # padded keys masked out
        hidden = self.encoder(self.embeddings(input_ids), mask)
        last = self.final_layer_norm(hidden[-1])
        pooled = last[jnp.arange(b), eos_index(input_ids, cfg)]
        out = {"last_hidden_state": last, "pooled": pooled, "hidden_states": tuple(hidden)}
        if cfg.projection_dim:
            out["text_embeds"] = self.text_projection(pooled)
        return out

    def clip_skip(self, hidden_states, skip: int):
        """The hidden states ``skip`` layers before the last, through the final layer norm."""
        return self.final_layer_norm(hidden_states[-1 - skip])

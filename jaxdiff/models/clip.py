"""CLIP (Radford et al. 2021): a ViT image tower and the text tower, projected into one embedding space.

Param names mirror transformers' ``CLIPModel`` (``vision_model/...``, ``text_model/...``,
``visual_projection``, ``text_projection``, ``logit_scale``), so weight import is a table
(``jaxdiff.convert.clip``). Images enter NHWC, already normalised (:func:`normalize`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

from jaxdiff import sharding as sh
from jaxdiff.models.layers import constrain, dense, layer_norm
from jaxdiff.models.text import Encoder, TextConfig, TextTransformer

Dtype = Any
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"VisionConfig: hidden_size {self.hidden_size} does not split into "
                f"{self.num_attention_heads} heads"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(
                f"VisionConfig: hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig = TextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # the temperature, as log(1 / tau)
    logit_bias_init: float | None = None  # a learnable logit bias (SigLIP's sigmoid loss: -10)
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self):
        if self.text.projection_dim is not None:
            raise ValueError(
                "CLIPConfig: the text tower's projection belongs to CLIP (text_projection); "
                "leave text.projection_dim None"
            )


_OPENAI_TEXT = TextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
PRESETS = {
    # tests: every part present, a few thousand params
    "tiny": CLIPConfig(
        text=TextConfig(
            vocab_size=1000,
            max_position_embeddings=16,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            eos_token_id=999,
            bos_token_id=998,
            pad_token_id=999,
        ),
        vision=VisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    ),
    # the shapes world (configs/shapes_sd/clip.py): 64 px, the 644-token shapes tokenizer
    # (tokenizer.write_small_clip_tokenizer(shapes_world.vocabulary())), 20-token captions
    "shapes": CLIPConfig(
        text=TextConfig(
            vocab_size=644,
            max_position_embeddings=20,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            eos_token_id=643,
            bos_token_id=642,
            pad_token_id=643,
        ),
        vision=VisionConfig(
            image_size=64,
            patch_size=8,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=128,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
    # OpenAI's released models
    "b32": CLIPConfig(text=_OPENAI_TEXT, vision=VisionConfig(patch_size=32), projection_dim=512),
    "b16": CLIPConfig(text=_OPENAI_TEXT, vision=VisionConfig(patch_size=16), projection_dim=512),
    "l14": CLIPConfig(
        text=TextConfig(),
        vision=VisionConfig(
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
        ),
        projection_dim=768,
    ),
}


class _VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):  # [B, H, W, C]
        cfg, p = self.config, self.config.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (sh.CONV_H, sh.CONV_W, sh.EMBED, sh.MLP)
            ),
        )(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # [B, N, D]
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.EMBED,)),
            (cfg.hidden_size,),
            self.param_dtype,
        )
        x = jnp.concatenate(
            [jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, cfg.hidden_size)), patches], 1
        )
        pos = nn.Embed(
            cfg.num_patches + 1,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="position_embedding",
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (sh.LENGTH, sh.EMBED)
            ),
        )(jnp.arange(x.shape[1]))
        return x + pos[None]  # [B, 1 + N, D]


class VisionTransformer(nn.Module):
    """images [B, H, W, C] (normalised) -> {'last_hidden_state' [B, 1 + N, D], 'pooled' [B, D]
    (the class token through ``post_layernorm``), 'hidden_states'}: transformers' ``CLIPVisionModel``."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"images {tuple(pixels.shape[1:])} do not fit the vision tower's "
                f"{(cfg.image_size, cfg.image_size, cfg.num_channels)} (resize with clip.preprocess)"
            )
        x = _VisionEmbeddings(cfg, name="embeddings", **kw)(pixels.astype(self.dtype))
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(
            x
        )  # sic: transformers' spelling
        x = constrain(x, sh.BATCH, sh.LENGTH, sh.EMBED)
        hidden = Encoder(cfg, name="encoder", **kw)(x, None)
        pooled = layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(hidden[-1][:, 0])
        return {"last_hidden_state": hidden[-1], "pooled": pooled, "hidden_states": tuple(hidden)}


def l2_normalize(x, eps=1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
    """(token ids [B, T], images [B', H, W, C]) -> L2-normalised embeddings and logits.

    ``image_features`` / ``text_features`` give the projected, unnormalised features (transformers'
    ``get_image_features`` / ``get_text_features``); ``__call__`` returns
    {'image_embeds', 'text_embeds' (normalised, [B', P] / [B, P]), 'logit_scale', 'logit_bias',
    'logits_per_image' [B', B]}.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = TextTransformer(cfg.text, **kw)
        self.vision_model = VisionTransformer(cfg.vision, **kw)
        self.visual_projection = dense(cfg.projection_dim, use_bias=False, **kw)
        self.text_projection = dense(cfg.projection_dim, use_bias=False, **kw)
        const = lambda v: nn.with_logical_partitioning(nn.initializers.constant(v), ())  # noqa: E731
        self.logit_scale = self.param("logit_scale", const(cfg.logit_scale_init), (), jnp.float32)
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", const(cfg.logit_bias_init), (), jnp.float32)

    def image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels)["pooled"])

    def text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooled"])

    def temperature(self):
        """(logit_scale, logit_bias): the learnt log inverse temperature and bias (0 without one)."""
        bias = (
            self.logit_bias
            if self.config.logit_bias_init is not None
            else jnp.zeros((), jnp.float32)
        )
        return self.logit_scale, bias

    def __call__(self, input_ids, pixels, attention_mask=None):
        img = l2_normalize(self.image_features(pixels))
        txt = l2_normalize(self.text_features(input_ids, attention_mask))
        scale, bias = self.temperature()
        logits = jnp.exp(scale) * img @ txt.T + bias
        return {
            "image_embeds": img,
            "text_embeds": txt,
            "logit_scale": scale,
            "logit_bias": bias,
            "logits_per_image": logits,
        }


def normalize(images, config: CLIPConfig):
    """Images in [0, 1] (float, [..., H, W, 3]) -> the tower's input: (x - mean) / std per channel."""
    mean, std = (
        jnp.asarray(config.image_mean, jnp.float32),
        jnp.asarray(config.image_std, jnp.float32),
    )
    return (jnp.asarray(images, jnp.float32) - mean) / std


def preprocess(images, config: CLIPConfig):
    """uint8 or [0, 1] float images [N, H, W, 3] of any square-or-not size -> the vision tower's
    normalised input: bicubic resize of the shorter side to ``image_size``, centre crop (as
    transformers' ``CLIPImageProcessor``; done with PIL on the host)."""

    size = config.vision.image_size
    out = []
    for img in images:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
        if img.shape[:2] != (size, size):
            pil = Image.fromarray(img)
            w, h = pil.size
            # the long side floors (size * long // short), as transformers and torchvision do: rounding
            # it instead shifts the whole crop by a pixel on e.g. 451x300 -> 224
            short = min(w, h)
            pil = pil.resize((size * w // short, size * h // short), Image.Resampling.BICUBIC)
            left, top = (pil.width - size) // 2, (pil.height - size) // 2
            img = np.asarray(pil.crop((left, top, left + size, top + size)))
        out.append(img)
    return normalize(np.stack(out).astype(np.float32) / 255.0, config)


def dummy_inputs(config: CLIPConfig):
    """The smallest inputs that initialise every param."""
    v = config.vision
    return (
        jnp.zeros((1, 1), jnp.int32),
        jnp.zeros((1, v.image_size, v.image_size, v.num_channels)),
    )


def init_params(config: CLIPConfig, key, boxed: bool = False):
    params = jax.jit(lambda k: CLIP(config).init(k, *dummy_inputs(config))["params"])(
        key
    )  # one compile, not one per op
    return params if boxed else nn.unbox(params)


def text_encoder(config: CLIPConfig, params) -> tuple[TextConfig, Any]:
    """The text tower alone (config, params): a Stable Diffusion text encoder conditioned on its
    ``last_hidden_state``, as SD 1.x uses OpenAI CLIP's."""
    return config.text, params["text_model"]


def embed_fns(config: CLIPConfig):
    """Jittable (params, pixels) -> normalised image embeddings and (params, ids) -> text embeddings."""
    model = CLIP(config)
    img = lambda p, x: l2_normalize(model.apply({"params": p}, x, method=CLIP.image_features))  # noqa: E731
    txt = lambda p, ids: l2_normalize(model.apply({"params": p}, ids, method=CLIP.text_features))  # noqa: E731
    return jax.jit(img), jax.jit(txt)


def config_to_dict(config: CLIPConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> CLIPConfig:
    """The inverse of :func:`config_to_dict` (what a training run saves as ``clip.json``)."""
    d = dict(d)
    text, vision = TextConfig(**d.pop("text")), VisionConfig(**d.pop("vision"))
    return CLIPConfig(
        text=text,
        vision=vision,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()},
    )

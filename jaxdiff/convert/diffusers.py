"""diffusers-format folders <-> jaxdiff configs and params (UNet, VAE, CLIP text encoder).

A folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json`` and the
component folders ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.convert import naming, tensors
from jaxdiff.models import text as text_lib
from jaxdiff.models import unet as unet_lib
from jaxdiff.models import vae as vae_lib

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


class ModelFolderError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ModelFolderError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from e


def _tuple(v, n):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _reject(cfg: dict, what: str, **allowed):
    """Refuse config options this implementation does not support, naming them."""
    bad = {k: cfg[k] for k, ok in allowed.items() if k in cfg and cfg[k] not in ok}
    if bad:
        raise ModelFolderError(f"{what}: unsupported config options {bad}")


# --- UNet -----------------------------------------------------------------------------------------

# a UNet with jaxdiff's position embedding (UNetConfig.position_embedding) writes this key, which
# diffusers' UNet2DConditionModel does not know: such a folder loads in jaxdiff only
POSITION_KEY = "jaxdiff_position_embedding"
# jaxdiff's UNet extensions, one row each: UNetConfig field, its key in the folder's config.json, its name
# in messages, its unit. The export, the single-file writer and `jaxdiff train` all read this table.
UNET_EXTENSIONS = (("position_embedding", POSITION_KEY, "position embedding", "octaves"),)


def unet_config_from_diffusers(d: dict) -> unet_lib.UNetConfig:
    _reject(
        d,
        "unet",
        class_embed_type=(None,),
        encoder_hid_dim_type=(None,),
        time_cond_proj_dim=(None,),
        resnet_time_scale_shift=("default",),
        act_fn=("silu",),
        dual_cross_attention=(False,),
        center_input_sample=(False,),
        mid_block_type=("UNetMidBlock2DCrossAttn", None),
        conv_in_kernel=(3,),
        conv_out_kernel=(3,),
        time_embedding_type=("positional",),
        timestep_post_act=(None,),
        addition_embed_type=(None, "text_time", "text"),
        attention_type=("default",),
        num_class_embeds=(None,),
        time_embedding_dim=(None,),
        downsample_padding=(1,),
        mid_block_scale_factor=(1, 1.0),
        reverse_transformer_layers_per_block=(None,),
        class_embeddings_concat=(False,),
        cross_attention_norm=(None,),
        resnet_skip_time_act=(False,),
        resnet_out_scale_factor=(1, 1.0),
        encoder_hid_dim=(None,),
    )
    n = len(d["block_out_channels"])
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' misnomer
    if isinstance(d.get("only_cross_attention"), list) and len(set(d["only_cross_attention"])) > 1:
        raise ModelFolderError("unet: per-block only_cross_attention is not supported")
    tlpb = d.get("transformer_layers_per_block", 1)
    if any(isinstance(t, (list, tuple)) for t in _tuple(tlpb, n)):
        raise ModelFolderError("unet: nested transformer_layers_per_block is not supported")
    return unet_lib.UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_out_channels=tuple(d["block_out_channels"]),
        down_block_types=tuple(d["down_block_types"]),
        up_block_types=tuple(d["up_block_types"]),
        layers_per_block=d.get("layers_per_block", 2),
        num_attention_heads=_tuple(heads, n),
        transformer_layers_per_block=_tuple(tlpb, n),
        cross_attention_dim=d.get("cross_attention_dim", 1280),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        only_cross_attention=bool(_tuple(d.get("only_cross_attention", False), 1)[0]),
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        mid_block=d.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
        addition_embed_type=d.get("addition_embed_type"),
        addition_time_embed_dim=d.get("addition_time_embed_dim"),
        addition_embed_type_num_heads=d.get("addition_embed_type_num_heads") or 64,
        projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
        sample_size=d.get("sample_size") or 64,
        **{field: d.get(key, 0) for field, key, *_ in UNET_EXTENSIONS},
    )


def unet_config_to_diffusers(c: unet_lib.UNetConfig) -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": list(c.down_block_types),
        "up_block_types": list(c.up_block_types),
        "layers_per_block": c.layers_per_block,
        "attention_head_dim": list(c.num_attention_heads),
        "transformer_layers_per_block": list(c.transformer_layers_per_block),
        "cross_attention_dim": c.cross_attention_dim,
        "use_linear_projection": c.use_linear_projection,
        "upcast_attention": c.upcast_attention,
        "only_cross_attention": c.only_cross_attention,
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if c.mid_block else None,
        "addition_embed_type": c.addition_embed_type,
        "addition_time_embed_dim": c.addition_time_embed_dim,
        "addition_embed_type_num_heads": c.addition_embed_type_num_heads,
        "projection_class_embeddings_input_dim": c.projection_class_embeddings_input_dim,
        "sample_size": c.sample_size,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        **{key: getattr(c, field) for field, key, *_ in UNET_EXTENSIONS if getattr(c, field)},
    }


# --- VAE ------------------------------------------------------------------------------------------


def vae_config_from_diffusers(d: dict) -> vae_lib.VAEConfig:
    n = len(d["block_out_channels"])
    _reject(
        d,
        "vae",
        act_fn=("silu",),
        down_block_types=(["DownEncoderBlock2D"] * n,),
        up_block_types=(["UpDecoderBlock2D"] * n,),
        latents_mean=(None,),
        latents_std=(None,),
    )
    return vae_lib.VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        block_out_channels=tuple(d["block_out_channels"]),
        layers_per_block=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4),
        norm_num_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor"),
        use_quant_conv=d.get("use_quant_conv", True),
        use_post_quant_conv=d.get("use_post_quant_conv", True),
        mid_block_add_attention=d.get("mid_block_add_attention", True),
        sample_size=d.get("sample_size") or 512,
    )


def vae_config_to_diffusers(c: vae_lib.VAEConfig) -> dict:
    n = len(c.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "act_fn": "silu",
        "latent_channels": c.latent_channels,
        "norm_num_groups": c.norm_num_groups,
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_block_add_attention,
    }


# --- CLIP text encoder ----------------------------------------------------------------------------


def text_config_from_transformers(d: dict) -> text_lib.TextConfig:
    arch = (d.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ModelFolderError(f"text_encoder: architecture {arch} is not a CLIP text model")
    return text_lib.TextConfig(
        vocab_size=d["vocab_size"],
        max_position_embeddings=d.get("max_position_embeddings", 77),
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        hidden_act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        eos_token_id=d.get("eos_token_id", 2),
        pad_token_id=d.get("pad_token_id", 1),
        bos_token_id=d.get("bos_token_id", 49406),
        projection_dim=d.get("projection_dim") if arch == "CLIPTextModelWithProjection" else None,
    )


def text_config_to_transformers(c: text_lib.TextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if c.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "projection_dim": c.projection_dim or 512,
        "torch_dtype": "float32",
    }


def _text_keys_in(sd: dict) -> dict:
    # transformers nests the tower under text_model.; the projection sits beside it.
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _text_keys_out(sd: dict) -> dict:
    return {
        (k if k.startswith("text_projection.") else "text_model." + k): v for k, v in sd.items()
    }


# --- components -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Component:
    """How one component folder maps to a jaxdiff module."""

    config_from: Any
    config_to: Any
    module: Any
    weights: tuple[str, ...]
    dummy_inputs: Any
    keys_in: Any = staticmethod(lambda sd: sd)
    keys_out: Any = staticmethod(lambda sd: sd)
    ignore: tuple[str, ...] = ()


def _unet_inputs(c: unet_lib.UNetConfig):
    added = None
    if c.addition_embed_type == "text_time":
        n_ids = 6
        added = {
            "text_embeds": jnp.zeros(
                (1, c.projection_class_embeddings_input_dim - n_ids * c.addition_time_embed_dim)
            ),
            "time_ids": jnp.zeros((1, n_ids)),
        }
    f = 2 ** (len(c.block_out_channels) - 1)
    return (
        jnp.zeros((1, f, f, c.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, c.cross_attention_dim)),
        added,
    )


COMPONENTS = {
    "unet": Component(
        unet_config_from_diffusers,
        unet_config_to_diffusers,
        unet_lib.UNet,
        DIFFUSERS_WEIGHTS,
        _unet_inputs,
    ),
    "vae": Component(
        vae_config_from_diffusers,
        vae_config_to_diffusers,
        vae_lib.AutoencoderKL,
        DIFFUSERS_WEIGHTS,
        lambda c: (jnp.zeros((1, c.downscale, c.downscale, c.in_channels)),),
    ),
    "text_encoder": Component(
        text_config_from_transformers,
        text_config_to_transformers,
        text_lib.TextTransformer,
        TRANSFORMERS_WEIGHTS,
        lambda c: (jnp.zeros((1, 1), jnp.int32),),
        _text_keys_in,
        _text_keys_out,
        ignore=(r"(^|\.)position_ids$",),
    ),
}


@functools.lru_cache(maxsize=32)
def abstract_params(kind: str, config, dtype=jnp.float32):
    """Param shapes of a component (no compute, no allocation), boxed with logical axis names."""
    comp = COMPONENTS[kind]
    model = comp.module(config, param_dtype=dtype)
    return jax.eval_shape(model.init, jax.random.key(0), *comp.dummy_inputs(config))["params"]


def params_from_state_dict(kind: str, config, state_dict: dict, dtype=jnp.float32, what=None):
    """A PyTorch-layout state dict -> the component's Flax params (every key checked)."""
    comp = COMPONENTS[kind]

    shapes = nn.unbox(abstract_params(kind, config, dtype))
    return naming.torch_to_flax(
        comp.keys_in(state_dict), shapes, ignore=comp.ignore, what=what or kind, dtype=dtype
    )


def load_component(folder, kind: str, dtype=jnp.float32, variant: str | None = None):
    """(config, params) of one component folder (``unet/``, ``vae/`` or ``text_encoder/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such {kind} folder")
    comp = COMPONENTS[kind]
    config = comp.config_from(_read_json(folder / "config.json"))
    weights = tensors.find_weights(folder, comp.weights, variant)
    params = params_from_state_dict(
        kind, config, tensors.read_tensors(weights), dtype, what=f"{kind} ({weights})"
    )
    return config, params


def save_component(folder, kind: str, config, params):
    """Write a component folder diffusers/transformers can load (config.json + safetensors)."""
    comp = COMPONENTS[kind]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = comp.keys_out(naming.flax_to_torch(params))
    tensors.write_safetensors(folder / f"{comp.weights[0]}.safetensors", sd, {"format": "pt"})
    _write_json(folder / "config.json", comp.config_to(config))


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)

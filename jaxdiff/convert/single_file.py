"""Original single-file Stable Diffusion 1.x / 2.x checkpoints (the CompVis / Stability LDM layout).

One ``.safetensors`` (or ``.ckpt``) holds the whole model: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and the text encoder, either ``cond_stage_model.transformer.text_model.*``
(SD 1.x: OpenAI CLIP, transformers' names) or ``cond_stage_model.model.*`` (SD 2.x: OpenCLIP ViT-H).
This module only renames keys (reshaping where the layouts differ) to the diffusers names that
:func:`jaxdiff.convert.diffusers.params_from_state_dict` reads, and back.

What a file does not tell, so :func:`infer_configs` assumes the SD convention: v-prediction vs epsilon
(SD 2.x 768 models are v-prediction; weights look the same: set the scheduler's ``prediction_type``
yourself), attention head counts (SD 1.x: 8 per block, SD 2.x and CLIP: 64 channels per head),
GroupNorm groups (32), ``upcast_attention`` and sample sizes (from the sd15 / sd21 presets).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxdiff.convert import diffusers as dlib
from jaxdiff.convert import naming, tensors
from jaxdiff.convert.naming import ConversionError
from jaxdiff.models import text as text_lib
from jaxdiff.models import unet as unet_lib
from jaxdiff.models import vae as vae_lib

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."

# Tensors a training checkpoint carries that no inference model uses. Anything else unknown is an error.
IGNORE = (
    # EMA copies (flattened names) and counters: model.diffusion_model.* is what loads, as in diffusers
    # (in the "ema-only" releases those already are the EMA weights).
    r"^model_ema\.",
    r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+)$",  # schedule
    r"^(logvar|lvlb_weights)$",
    r"^first_stage_model\.loss\.",  # the VAE's training loss (LPIPS, discriminator)
    r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$",  # an index buffer
    r"^cond_stage_model\.model\.(logit_scale|attn_mask)$",  # OpenCLIP's contrastive / mask buffers
)

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_W = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# OpenCLIP fuses q, k, v into one in_proj; "[q]" names a third of it (see _unfuse / _fuse).
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    **{
        f"self_attn.{p}_proj.{w}": f"attn.in_proj_{w}[{p}]"
        for p in "qkv"
        for w in ("weight", "bias")
    },
}
_FUSED = re.compile(
    r"^(cond_stage_model\.model\.transformer\.resblocks\.\d+\.attn\.in_proj_(?:weight|bias))"
    r"(?:\[([qkv])\])?$"
)
_RESBLOCK = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


# --- module prefix tables: diffusers prefix -> (LDM prefix, renames of what follows) ---------------


def _unet_prefixes(c: unet_lib.UNetConfig) -> dict:
    lpb, n = c.layers_per_block, len(c.block_out_channels)
    t = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    # input_blocks: 0 is conv_in, then per down block lpb (resnet, attention) pairs and a downsampler;
    # output_blocks: per up block lpb + 1 (resnet, attention) pairs, the upsampler after the last pair.
    for i in range(n):
        for j in range(lpb):
            t[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * (lpb + 1) + j}.0"
            t[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * (lpb + 1) + j}.1"
        t[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"
        for j in range(lpb + 1):
            t[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (lpb + 1) + j}.0"
            t[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (lpb + 1) + j}.1"
        slot = 2 if c.up_block_types[i] == unet_lib.CROSS_UP else 1  # after the attention, if any
        t[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv"
    return {k: (UNET + v, _UNET_RESNET if ".resnets." in k else None) for k, v in t.items()}


def _vae_prefixes(c: vae_lib.VAEConfig) -> dict:
    n, lpb = len(c.block_out_channels), c.layers_per_block
    t = {"quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        t |= {
            f"{part}.conv_in": (f"{part}.conv_in", None),
            f"{part}.conv_out": (f"{part}.conv_out", None),
            f"{part}.conv_norm_out": (f"{part}.norm_out", None),
            f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", _VAE_RESNET),
            f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", _VAE_RESNET),
            f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", _VAE_ATTN),
        }
    for i in range(n):
        for j in range(lpb):
            t[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        t[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
            f"encoder.down.{i}.downsample.conv",
            None,
        )
        # LDM numbers decoder levels by resolution (0 = full size), diffusers in execution order.
        for j in range(lpb + 1):
            t[f"decoder.up_blocks.{i}.resnets.{j}"] = (
                f"decoder.up.{n - 1 - i}.block.{j}",
                _VAE_RESNET,
            )
        t[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
            f"decoder.up.{n - 1 - i}.upsample.conv",
            None,
        )
    return {k: (VAE + v, sub) for k, (v, sub) in t.items()}


def _clip_prefixes(c: text_lib.TextConfig) -> dict:
    return {"": (CLIP.rstrip("."), None)}


def _openclip_prefixes(c: text_lib.TextConfig) -> dict:
    t = {
        "embeddings.token_embedding": ("token_embedding", None),
        "embeddings.position_embedding.weight": ("positional_embedding", None),  # a bare Parameter
        "final_layer_norm": ("ln_final", None),
        "text_projection.weight": ("text_projection", None),
    }
    t |= {
        f"encoder.layers.{i}": (f"transformer.resblocks.{i}", _OPENCLIP_LAYER)
        for i in range(c.num_hidden_layers)
    }
    return {k: (OPENCLIP + v, sub) for k, (v, sub) in t.items()}


LAYOUTS = {
    "unet": ("unet", _unet_prefixes),
    "vae": ("vae", _vae_prefixes),
    "clip": ("text_encoder", _clip_prefixes),
    "openclip": ("text_encoder", _openclip_prefixes),
}


def _ldm_key(key: str, prefixes: dict) -> str:
    parts = key.split(".")
    for i in range(len(parts), -1, -1):  # the longest matching module prefix wins
        if (head := ".".join(parts[:i])) in prefixes:
            new, sub = prefixes[head]
            rest = ".".join(parts[i:])
            for old, repl in (sub or {}).items():
                if rest == old or rest.startswith(old + "."):
                    rest = repl + rest[len(old) :]
                    break
            return f"{new}.{rest}" if rest else new
    raise ConversionError(f"no single-file name for {key!r}")


def key_table(layout: str, config) -> dict[str, str]:
    """diffusers key -> LDM key for every param of the model ``config`` describes."""
    return dict(_key_table(layout, config))


@functools.lru_cache(maxsize=16)  # tracing a full-size model for its param names takes seconds
def _key_table(layout: str, config) -> tuple:
    kind, prefixes = LAYOUTS[layout]
    shapes = nn.unbox(dlib.abstract_params(kind, config))
    pairs = tuple(
        (k, _ldm_key(k, prefixes(config)))
        for k in (naming.torch_key(p) for p in traverse_util.flatten_dict(shapes))
    )
    assert len({v for _, v in pairs}) == len(pairs), f"{layout}: the key table is not one-to-one"
    return pairs


# --- value transforms -----------------------------------------------------------------------------


def _unfuse(sd: dict) -> dict:
    """Split each OpenCLIP in_proj (q, k, v stacked on dim 0) into three named thirds."""
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m and not m.group(2):
            if v.shape[0] % 3:
                raise ConversionError(f"{k}: shape {tuple(v.shape)} does not split into q, k, v")
            out |= {f"{k}[{p}]": part for p, part in zip("qkv", np.split(np.asarray(v), 3, axis=0))}
        else:
            out[k] = v
    return out


def _fuse(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if not _FUSED.match(k)}
    for k in sd:
        if (m := _FUSED.match(k)) and m.group(2) == "q":
            out[m.group(1)] = np.concatenate([sd[f"{m.group(1)}[{p}]"] for p in "qkv"], axis=0)
    return out


def _to_diffusers_value(layout: str, dkey: str, v):
    if layout == "vae" and _VAE_ATTN_W.search(dkey) and v.ndim == 4:
        return v[:, :, 0, 0]  # LDM's 1x1 convs are diffusers' Linear layers
    if layout == "openclip" and dkey == "text_projection.weight":
        return np.asarray(v).T  # OpenCLIP multiplies x @ P; a Linear stores P transposed
    return v


def _to_ldm_value(layout: str, dkey: str, v: np.ndarray) -> np.ndarray:
    if layout == "vae" and _VAE_ATTN_W.search(dkey):
        return v[:, :, None, None]
    if layout == "openclip" and dkey == "text_projection.weight":
        return np.ascontiguousarray(v.T)
    return v


# --- config inference -----------------------------------------------------------------------------


def _indices(sd, pattern: str) -> list[int]:
    r = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := r.match(k))})


def _text_layout(sd) -> str:
    if any(k.startswith(OPENCLIP) for k in sd):
        return "openclip"
    if any(k.startswith(CLIP) for k in sd):
        return "clip"
    raise ConversionError(
        "no text encoder in the checkpoint (neither cond_stage_model.transformer.text_model.* "
        "nor cond_stage_model.model.*): not an SD 1.x / 2.x single file"
    )


def infer_configs(sd: dict) -> tuple:
    """(UNetConfig, VAEConfig, TextConfig) from a single file's key names and shapes (see module doc)."""
    layout = _text_layout(sd)
    ctx = [
        v.shape[1] for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")
    ]
    if not ctx or not any(k.startswith(VAE) for k in sd):
        raise ConversionError(
            "the checkpoint lacks the UNet (model.diffusion_model.*) or the VAE "
            "(first_stage_model.*): not an SD 1.x / 2.x single file"
        )
    sd2 = layout == "openclip" or ctx[0] == 1024
    return _infer_unet(sd, sd2, ctx[0]), _infer_vae(sd, sd2), _infer_text(sd, layout)


def _infer_unet(sd, sd2: bool, ctx: int) -> unet_lib.UNetConfig:
    base = unet_lib.PRESETS["sd21" if sd2 else "sd15"]
    ops = _indices(sd, rf"^{re.escape(UNET)}input_blocks\.(\d+)\.0\.op\.weight$")
    lpb = ops[0] - 1 if ops else base.layers_per_block  # the first downsampler follows lpb layers
    n = len(_indices(sd, rf"^{re.escape(UNET)}output_blocks\.(\d+)\.")) // (lpb + 1)
    first = [1 + i * (lpb + 1) for i in range(n)]
    chans = tuple(int(sd[f"{UNET}input_blocks.{b}.0.out_layers.3.weight"].shape[0]) for b in first)
    cross = [f"{UNET}input_blocks.{b}.1.proj_in.weight" in sd for b in first]
    layers = tuple(
        len(_indices(sd, rf"^{re.escape(UNET)}input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\."))
        or 1
        for b in first
    )
    proj = next(
        (v for k, v in sd.items() if k.startswith(UNET) and k.endswith(".proj_in.weight")), None
    )
    return dataclasses.replace(
        base,
        in_channels=int(sd[f"{UNET}input_blocks.0.0.weight"].shape[1]),
        out_channels=int(sd[f"{UNET}out.2.weight"].shape[0]),
        block_out_channels=chans,
        down_block_types=tuple(unet_lib.CROSS_DOWN if c else unet_lib.DOWN for c in cross),
        up_block_types=tuple(
            unet_lib.CROSS_UP
            if f"{UNET}output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in sd
            else unet_lib.UP
            for i in range(n)
        ),
        layers_per_block=lpb,
        transformer_layers_per_block=layers,
        cross_attention_dim=int(ctx),
        num_attention_heads=tuple(max(1, c // 64) for c in chans) if sd2 else (8,) * n,
        use_linear_projection=proj is not None and proj.ndim == 2,
        mid_block=f"{UNET}middle_block.0.in_layers.0.weight" in sd,
    )


def _infer_vae(sd, sd2: bool) -> vae_lib.VAEConfig:
    n = len(_indices(sd, rf"^{re.escape(VAE)}encoder\.down\.(\d+)\."))
    return dataclasses.replace(
        vae_lib.PRESETS["sd21" if sd2 else "sd15"],
        in_channels=int(sd[f"{VAE}encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd[f"{VAE}decoder.conv_out.weight"].shape[0]),
        block_out_channels=tuple(
            int(sd[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)
        ),
        layers_per_block=len(_indices(sd, rf"^{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=int(sd[f"{VAE}decoder.conv_in.weight"].shape[1]),
        use_quant_conv=f"{VAE}quant_conv.weight" in sd,
        use_post_quant_conv=f"{VAE}post_quant_conv.weight" in sd,
        mid_block_add_attention=f"{VAE}encoder.mid.attn_1.q.weight" in sd,
    )


def _infer_text(sd, layout: str) -> text_lib.TextConfig:
    if layout == "clip":
        tok, pos = (
            sd[f"{CLIP}embeddings.token_embedding.weight"],
            sd[f"{CLIP}embeddings.position_embedding.weight"],
        )
        n = len(_indices(sd, rf"^{re.escape(CLIP)}encoder\.layers\.(\d+)\."))
        inter = sd[f"{CLIP}encoder.layers.0.mlp.fc1.weight"].shape[0]
        base = text_lib.PRESETS["sd15"]
    else:  # SD 2.x conditions on the penultimate layer: the last resblock is dropped (see _split)
        tok, pos = sd[f"{OPENCLIP}token_embedding.weight"], sd[f"{OPENCLIP}positional_embedding"]
        n = len(_indices(sd, _RESBLOCK.pattern)) - 1
        inter = sd[f"{OPENCLIP}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        base = text_lib.PRESETS["sd21"]
    return dataclasses.replace(
        base,
        vocab_size=int(tok.shape[0]),
        hidden_size=int(tok.shape[1]),
        max_position_embeddings=int(pos.shape[0]),
        num_hidden_layers=n,
        intermediate_size=int(inter),
        num_attention_heads=max(1, int(tok.shape[1]) // 64),
    )


# --- load / save ----------------------------------------------------------------------------------


def _split(sd: dict, configs: dict) -> dict[str, dict]:
    """Rename a single file's tensors into one diffusers-named state dict per layout; every tensor must
    be used or explicitly ignored and every param present, else a ConversionError names the keys."""
    sd = _unfuse(sd)
    ignore = [re.compile(r) for r in IGNORE]
    if "openclip" in configs:
        have = _indices(sd, _RESBLOCK.pattern)
        n = configs["openclip"].num_hidden_layers
        if len(have) != n + 1:
            raise ConversionError(
                f"text_encoder: the checkpoint has {len(have)} OpenCLIP resblocks; SD 2.x uses "
                f"all but the last, so the text config needs {len(have) - 1} layers, not {n}"
            )
        ignore.append(
            re.compile(rf"^{re.escape(OPENCLIP)}transformer\.resblocks\.{n}\.")
        )  # unused last block
        if not configs["openclip"].projection_dim:  # only SDXL's second encoder uses the projection
            ignore.append(re.compile(rf"^{re.escape(OPENCLIP)}text_projection$"))
    out, used, missing = {}, set(), []
    for layout, config in configs.items():
        table = key_table(layout, config)
        missing += [ldm for ldm in table.values() if ldm not in sd]
        out[layout] = {
            d: _to_diffusers_value(layout, d, sd[ldm]) for d, ldm in table.items() if ldm in sd
        }
        used |= set(table.values())
    unknown = sorted(k for k in sd if k not in used and not any(r.search(k) for r in ignore))
    if missing or unknown:
        msg = ["single file: the checkpoint does not match the model configs."]
        if missing:
            msg.append(
                f"{len(missing)} params have no tensor in the checkpoint: {naming._show(sorted(missing))}"
            )
        if unknown:
            msg.append(f"{len(unknown)} checkpoint tensors match no param: {naming._show(unknown)}")
        raise ConversionError("\n".join(msg))
    return out


def params_from_single_file(
    sd: dict, *, unet_config=None, vae_config=None, text_config=None, dtype=jnp.float32
) -> dict:
    """An LDM-layout state dict -> {"unet" | "vae" | "text_encoder": (config, params)}."""
    layout = _text_layout(sd)
    if unet_config is None or vae_config is None or text_config is None:
        inferred = infer_configs(sd)
        unet_config, vae_config, text_config = (
            given or guess for given, guess in zip((unet_config, vae_config, text_config), inferred)
        )
    configs = {"unet": unet_config, "vae": vae_config, layout: text_config}
    parts = _split(sd, configs)
    return {
        LAYOUTS[lay][0]: (
            cfg,
            dlib.params_from_state_dict(
                LAYOUTS[lay][0], cfg, parts[lay], dtype, what=f"{LAYOUTS[lay][0]} (single file)"
            ),
        )
        for lay, cfg in configs.items()
    }


def load_single_file(
    path, *, unet_config=None, vae_config=None, text_config=None, dtype=jnp.float32
) -> dict:
    """Load an original SD 1.x / 2.x single file (``.safetensors``, or a ``.ckpt`` read with
    ``torch.load(weights_only=True)``). Configs left None are inferred (see :func:`infer_configs`).
    Returns {"unet": (config, params), "vae": ..., "text_encoder": ...}."""
    return params_from_single_file(
        tensors.read_tensors(path),
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        dtype=dtype,
    )


def single_file_state_dict(
    *, unet, vae, text_encoder, text_layout: str | None = None
) -> dict[str, np.ndarray]:
    """jaxdiff (config, params) pairs -> an LDM-layout state dict (numpy, PyTorch layouts).

    ``text_layout``: "clip" (SD 1.x) or "openclip" (SD 2.x); by default "openclip" for GELU text encoders.
    OpenCLIP files hold one more resblock than SD 2.x runs (the penultimate layer conditions the UNet,
    and readers count blocks to find it), so an all-zero block is written last: with zero weights a
    pre-norm residual block is the identity, so even a reader that ran it would get the same output.
    """
    for field, _, what, _ in dlib.UNET_EXTENSIONS:
        if getattr(unet[0], field):
            raise ConversionError(
                f"the LDM single-file layout has no place for jaxdiff's UNet {what} "
                f"(UNetConfig.{field}); save a diffusers-style folder instead"
            )
    if unet[0].addition_embed_type == "text":
        raise ConversionError(
            "the LDM single-file layout has no place for pooled text in the time embedding "
            "(UNetConfig.addition_embed_type='text', DeepFloyd IF's); save a diffusers-style "
            "folder instead"
        )
    text_config = text_encoder[0]
    text_layout = text_layout or ("openclip" if text_config.hidden_act == "gelu" else "clip")
    out = {}
    for layout, (config, params) in (("unet", unet), ("vae", vae), (text_layout, text_encoder)):
        table = key_table(layout, config)
        for dkey, v in naming.flax_to_torch(params).items():
            out[table[dkey]] = _to_ldm_value(layout, dkey, v)
    if text_layout == "openclip":
        n = text_config.num_hidden_layers
        for k in [k for k in out if k.startswith(f"{OPENCLIP}transformer.resblocks.0.")]:
            out[k.replace(".resblocks.0.", f".resblocks.{n}.")] = np.zeros_like(out[k])
    return _fuse(out)


def save_single_file(path, *, unet, vae, text_encoder, text_layout: str | None = None):
    """Write an original-layout ``.safetensors`` single file (atomically); see :func:`single_file_state_dict`."""
    sd = single_file_state_dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_layout=text_layout
    )
    tensors.write_safetensors(path, sd, {"format": "pt"})

"""transformers ``CLIPModel`` folders <-> jaxdiff CLIP (config, params).

A folder is what ``CLIPModel.save_pretrained`` writes (``config.json``, ``model.safetensors``), usually
with a ``CLIPProcessor``'s files beside it: ``preprocessor_config.json`` (image size, mean, std) and the
tokenizer's. Param names already mirror transformers', so the weights go through the one
:mod:`jaxdiff.convert.naming` table; this module maps configs and checks that the parts agree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxdiff.convert import naming, tensors
from jaxdiff.convert.diffusers import (
    TRANSFORMERS_WEIGHTS,
    ModelFolderError,
    _read_json,
    _write_json,
)
from jaxdiff.models import clip as clip_lib
from jaxdiff.models.text import TextConfig

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json leaves out
TEXT_DEFAULTS = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
    pad_token_id=1,
    bos_token_id=49406,
)
VISION_DEFAULTS = dict(
    image_size=224,
    patch_size=32,
    num_channels=3,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
PROJECTION_DIM, LOGIT_SCALE_INIT = 512, 2.6592
# position_ids are index buffers (persistent in older transformers), not weights
IGNORE = (r"(^|\.)position_ids$",)
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

_KINDS = {  # folders that are not a CLIPModel: what they are, and what would read them
    "CLIPTextModel": "a CLIP text encoder alone (no vision tower); read it with "
    "jaxdiff.convert.diffusers.load_component(folder, 'text_encoder')",
    "CLIPVisionModel": "a CLIP vision tower alone (no text tower, no projections); jaxdiff reads vision "
    "towers only as part of a full CLIPModel",
    "CLIPForImageClassification": "a CLIP vision tower with a classifier head; jaxdiff has no classifier head",
    "SiglipModel": "a SigLIP model (sigmoid loss; its towers and pooling head differ from CLIP's); "
    "it is not a transformers CLIPModel",
}
_KINDS.update(
    {
        "CLIPTextModelWithProjection": _KINDS["CLIPTextModel"],
        "CLIPVisionModelWithProjection": _KINDS["CLIPVisionModel"],
        "Siglip2Model": _KINDS["SiglipModel"],
        "clip_text_model": _KINDS["CLIPTextModel"],
        "clip_vision_model": _KINDS["CLIPVisionModel"],
        "siglip": _KINDS["SiglipModel"],
        "siglip2": _KINDS["SiglipModel"],
    }
)


# --- config.json / preprocessor_config.json -> CLIPConfig -----------------------------------------


def _sub_config(d: dict, key: str) -> dict:
    # Old configs carry "text_config_dict"; transformers rebuilds the sub-config from it alone (its
    # missing keys take the defaults, whatever "text_config" says), so that is what counts.
    legacy = d.get(f"{key}_dict")
    return dict(legacy) if legacy else dict(d.get(key) or {})


def _square(v, name: str, what: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ModelFolderError(
                f"{what}: {name} {list(v)} is not square; jaxdiff's vision tower takes "
                "square images and patches (one int)"
            )
        v = v[0]
    return int(v)


def _text_config(t: dict, what: str) -> TextConfig:
    g = {**TEXT_DEFAULTS, **{k: v for k, v in t.items() if k in TEXT_DEFAULTS}}
    if not isinstance(g["eos_token_id"], int):
        raise ModelFolderError(
            f"{what}: text_config.eos_token_id {g['eos_token_id']!r} is not one int; "
            "give the id the tokenizer ends prompts with (its embedding is the pooled output)"
        )
    try:
        return TextConfig(**g)
    except ValueError as e:
        raise ModelFolderError(f"{what}: text_config is not supported: {e}") from None


def _vision_config(v: dict, what: str) -> clip_lib.VisionConfig:
    g = {**VISION_DEFAULTS, **{k: x for k, x in v.items() if k in VISION_DEFAULTS}}
    g["image_size"] = _square(g["image_size"], "vision_config.image_size", what)
    g["patch_size"] = _square(g["patch_size"], "vision_config.patch_size", what)
    try:
        return clip_lib.VisionConfig(**g)
    except ValueError as e:
        raise ModelFolderError(f"{what}: vision_config is not supported: {e}") from None


def _check_kind(d: dict, what: str):
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if "CLIPModel" in archs or (not archs and model_type == "clip"):
        return
    if not archs and model_type is None and ("text_config" in d or "vision_config" in d):
        return  # a bare CLIPConfig.to_dict() without the bookkeeping keys
    name = archs[0] if archs else model_type
    kind = _KINDS.get(name) or _KINDS.get(model_type) or "not a transformers CLIPModel"
    raise ModelFolderError(
        f"{what}: this is {name!r} (model_type {model_type!r}): {kind}. load_clip reads a "
        "transformers CLIPModel folder: config.json with architectures ['CLIPModel'] and "
        "model_type 'clip', as CLIPModel.save_pretrained writes"
    )


def _crop(v) -> tuple[int, int]:
    # crop_size: {"height", "width"}, or one int in older configs; CLIPImageProcessor's default is 224
    if v is None:
        return 224, 224
    return (v.get("height"), v.get("width")) if isinstance(v, dict) else (int(v), int(v))


def _shortest_edge(v) -> int | None:
    # size: {"shortest_edge"} (or one int, which older CLIP configs mean the same way); a {"height",
    # "width"} size squashes the image to a square instead, which preprocess does not do: None
    if v is None:
        return 224
    return v.get("shortest_edge") if isinstance(v, dict) else int(v)


def _rgb(v, name: str, what: str) -> tuple[float, float, float]:
    v = [v] * 3 if isinstance(v, (int, float)) else list(v)
    if len(v) != 3:
        raise ModelFolderError(f"{what}: preprocessor {name} {v} does not have 3 (RGB) values")
    return tuple(float(x) for x in v)


def _image_stats(p: dict, size: int, what: str):
    """(mean, std) from a CLIPImageProcessor config, after checking it crops what the tower takes."""
    if p.get("do_center_crop", True):
        crop = _crop(p.get("crop_size"))
        if crop != (size, size):
            raise ModelFolderError(
                f"{what}: preprocessor_config.json crops images to {crop[0]}x{crop[1]} but the vision tower "
                f"takes {size}x{size}; set its crop_size to {{'height': {size}, 'width': {size}}} (or fix "
                "vision_config.image_size)"
            )
    # What jaxdiff.models.clip.preprocess cannot mirror changes the pixels a little, not the weights: warn.
    differ = []
    if p.get("do_resize", True) and _shortest_edge(p.get("size")) != size:
        differ.append(f"resizes to {p.get('size')} (preprocess: the shorter side to {size})")
    if not p.get("do_center_crop", True):
        differ.append("does not centre-crop")
    if p.get("do_resize", True) and p.get("resample", 3) != 3:
        differ.append(f"resamples with PIL filter {p.get('resample')} (preprocess: bicubic, 3)")
    if p.get("do_rescale", True) and not math.isclose(p.get("rescale_factor", 1 / 255), 1 / 255):
        differ.append(f"rescales by {p.get('rescale_factor')} (preprocess: 1/255)")
    if differ:
        warnings.warn(
            f"{what}: the image preprocessor {'; '.join(differ)}; jaxdiff.models.clip.preprocess "
            "will not match it exactly",
            stacklevel=3,
        )
    if not p.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the tower takes [0, 1] pixels as they are
    return (
        _rgb(p.get("image_mean", clip_lib.OPENAI_MEAN), "image_mean", what),
        _rgb(p.get("image_std", clip_lib.OPENAI_STD), "image_std", what),
    )


def clip_config_from_transformers(
    d: dict, preprocessor: dict | None = None, *, what: str = "config.json"
) -> clip_lib.CLIPConfig:
    """A transformers CLIPModel ``config.json`` (and its ``preprocessor_config.json``, for mean and std)."""
    _check_kind(d, what)
    proj = d.get("projection_dim", PROJECTION_DIM)
    if not isinstance(proj, int) or proj <= 0:
        raise ModelFolderError(f"{what}: projection_dim {proj!r} is not a positive int")
    text = _text_config(_sub_config(d, "text_config"), what)
    vision = _vision_config(_sub_config(d, "vision_config"), what)
    mean, std = clip_lib.OPENAI_MEAN, clip_lib.OPENAI_STD  # CLIPImageProcessor's defaults
    if preprocessor is not None:
        mean, std = _image_stats(preprocessor, vision.image_size, what)
    return clip_lib.CLIPConfig(
        text=text,
        vision=vision,
        projection_dim=proj,
        logit_scale_init=float(d.get("logit_scale_init_value", LOGIT_SCALE_INIT)),
        image_mean=mean,
        image_std=std,
    )


# --- CLIPConfig -> config.json / preprocessor_config.json -----------------------------------------

_LOGIT_BIAS = (
    "this CLIP has a logit_bias (a sigmoid-loss model): transformers' CLIPModel has no such param, "
    "so it cannot be written as one. save_clip(..., drop_logit_bias=True) drops it (the embeddings "
    "and the softmax ranking stay the same; sigmoid probabilities do not)"
)


def clip_config_to_transformers(c: clip_lib.CLIPConfig) -> dict:
    """The ``config.json`` that ``CLIPModel.from_pretrained`` reads back to the same model."""
    if c.logit_bias_init is not None:
        raise ModelFolderError(_LOGIT_BIAS)
    t, v = c.text, c.vision
    text = {k: getattr(t, k) for k in TEXT_DEFAULTS}
    vision = {k: getattr(v, k) for k in VISION_DEFAULTS}
    # the towers' own projection_dim is unused by CLIPModel; keep it equal to avoid confusing readers
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.projection_dim,
        "logit_scale_init_value": c.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            **text,
            "projection_dim": c.projection_dim,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **vision,
            "projection_dim": c.projection_dim,
        },
    }


def preprocessor_config_to_transformers(c: clip_lib.CLIPConfig) -> dict:
    """A ``CLIPImageProcessor`` config doing what :func:`jaxdiff.models.clip.preprocess` does."""
    s = c.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": s},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(c.image_mean),
        "image_std": list(c.image_std),
    }


# --- weights --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def abstract_params(config: clip_lib.CLIPConfig, dtype=jnp.float32):
    """CLIP's param shapes and dtypes (no compute, no allocation)."""
    model = clip_lib.CLIP(config, param_dtype=dtype)
    return nn.unbox(
        jax.eval_shape(model.init, jax.random.key(0), *clip_lib.dummy_inputs(config))["params"]
    )


def params_from_state_dict(
    config: clip_lib.CLIPConfig, state_dict: dict, dtype=jnp.float32, what="CLIP"
):
    """A CLIPModel state dict -> params; every tensor is checked (only position_ids buffers are skipped)."""
    # dtype=None: each leaf takes its abstract dtype, so logit_scale stays float32 under bf16 params
    return naming.torch_to_flax(
        state_dict, abstract_params(config, dtype), ignore=IGNORE, what=what
    )


def load_clip(folder, dtype=jnp.float32) -> tuple[clip_lib.CLIPConfig, dict]:
    """(config, params) of a transformers CLIPModel folder (safetensors, .bin, or sharded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"{folder}: no such folder (expected a transformers CLIPModel folder: "
            "config.json and model.safetensors)"
        )
    if not (folder / "config.json").exists():
        hint = ""
        if (folder / "model_index.json").exists():
            hint = (
                "; it is a diffusers pipeline, whose text_encoder/ is a CLIPTextModel: read it with "
                "jaxdiff.convert.diffusers.load_component(folder / 'text_encoder', 'text_encoder')"
            )
        elif (folder / "open_clip_config.json").exists():
            hint = "; it is an OpenCLIP folder: give the transformers (CLIPModel) export instead"
        raise ModelFolderError(
            f"{folder}: no config.json, so not a transformers CLIPModel folder{hint}"
        )
    pre = folder / "preprocessor_config.json"
    config = clip_config_from_transformers(
        _read_json(folder / "config.json"),
        _read_json(pre) if pre.exists() else None,
        what=str(folder),
    )
    try:
        weights = tensors.find_weights(folder, TRANSFORMERS_WEIGHTS)
    except FileNotFoundError as e:
        raise ModelFolderError(str(e)) from None
    params = params_from_state_dict(
        config, tensors.read_tensors(weights), dtype, what=f"CLIP ({weights})"
    )
    return config, params


def _check_params(config: clip_lib.CLIPConfig, params):
    want = traverse_util.flatten_dict(abstract_params(config))
    have = traverse_util.flatten_dict(params)
    missing = sorted("/".join(p) for p in want if p not in have)
    extra = sorted("/".join(p) for p in have if p not in want)
    shapes = sorted(
        f"{'/'.join(p)}: {tuple(have[p].shape)}, config says {tuple(want[p].shape)}"
        for p in want
        if p in have and tuple(have[p].shape) != tuple(want[p].shape)
    )
    if missing or extra or shapes:
        msg = ["the params do not fit the config."]
        if missing:
            msg.append(f"missing: {naming._show(missing)}")
        if extra:
            msg.append(f"not in the config: {naming._show(extra)}")
        if shapes:
            msg.append("wrong shape: " + naming._show(shapes))
        raise ModelFolderError("\n".join(msg))


# --- tokenizer ------------------------------------------------------------------------------------


def _token_text(v, default: str) -> str:
    return v.get("content", default) if isinstance(v, dict) else (v or default)


def _tokenizer_files(folder, text: TextConfig) -> list[Path]:
    """The tokenizer files to copy, after checking the tokenizer fits the text tower."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such tokenizer folder")
    has = {n for n in TOKENIZER_FILES if (folder / n).exists()}
    if not {"vocab.json", "merges.txt"} <= has and "tokenizer.json" not in has:
        raise ModelFolderError(
            f"{folder}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, "
            "or tokenizer.json)"
        )
    vocab = (
        _read_json(folder / "vocab.json")
        if "vocab.json" in has
        else _read_json(folder / "tokenizer.json")["model"]["vocab"]
    )
    n = max(vocab.values()) + 1
    if n > text.vocab_size:
        raise ModelFolderError(
            f"{folder}: the tokenizer has {n} token ids but the text tower embeds "
            f"{text.vocab_size}; give the tokenizer the model was trained with"
        )
    cfg = _read_json(folder / "tokenizer_config.json") if "tokenizer_config.json" in has else {}
    eos = _token_text(cfg.get("eos_token"), "<|endoftext|>")
    # eos_token_id 2 is transformers' legacy rule (pool at the largest id): nothing to compare
    if text.eos_token_id != 2 and eos in vocab and vocab[eos] != text.eos_token_id:
        raise ModelFolderError(
            f"{folder}: the tokenizer ends prompts with {eos!r} (id {vocab[eos]}) but the "
            f"text tower pools at eos_token_id {text.eos_token_id}; they must agree"
        )
    length = cfg.get("model_max_length", 0)  # tokenizers without a limit say 1e30
    if text.max_position_embeddings < length < 10**6:
        raise ModelFolderError(
            f"{folder}: the tokenizer pads to {length} tokens but the text tower has "
            f"{text.max_position_embeddings} positions; set model_max_length to "
            f"{text.max_position_embeddings} in tokenizer_config.json"
        )
    return [folder / n for n in TOKENIZER_FILES if n in has]


def _copy(src: Path, dst: Path):
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --- export ---------------------------------------------------------------------------------------


def save_clip(
    folder,
    config: clip_lib.CLIPConfig,
    params,
    tokenizer_folder=None,
    *,
    drop_logit_bias: bool = False,
) -> Path:
    """Write a folder that ``CLIPModel`` / ``CLIPProcessor.from_pretrained`` load: config.json,
    model.safetensors, preprocessor_config.json and, given one, the tokenizer's files."""
    params = nn.unbox(params)
    if config.logit_bias_init is not None or "logit_bias" in params:
        if not drop_logit_bias:
            raise ModelFolderError(_LOGIT_BIAS)
        warnings.warn(
            "save_clip: dropping logit_bias (transformers' CLIPModel has none): softmax rankings "
            "are unchanged, sigmoid probabilities are not",
            stacklevel=2,
        )
        config = dataclasses.replace(config, logit_bias_init=None)
        params = {k: v for k, v in params.items() if k != "logit_bias"}
    _check_params(config, params)
    tokenizer = (
        _tokenizer_files(tokenizer_folder, config.text) if tokenizer_folder is not None else []
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = naming.flax_to_torch(params)
    tensors.write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    dtype = str(
        sd["text_model.embeddings.token_embedding.weight"].dtype
    )  # what from_pretrained loads as
    _write_json(folder / "config.json", {**clip_config_to_transformers(config), "dtype": dtype})
    _write_json(folder / "preprocessor_config.json", preprocessor_config_to_transformers(config))
    for src in tokenizer:
        _copy(src, folder / src.name)
    return folder

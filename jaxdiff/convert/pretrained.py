"""A whole Stable Diffusion checkpoint: diffusers folders in, diffusers folders out.

``load_pretrained(folder)`` reads what ``StableDiffusionPipeline.save_pretrained`` writes (safetensors
or ``.bin`` weights, fp32/fp16/bf16, sharded or not; ``variant="fp16"`` picks ``*.fp16.*`` files) and
``save_pretrained`` writes a folder diffusers loads back, so JAX-trained weights reach PyTorch tools.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert.clip import TOKENIZER_FILES
from jaxdiff.convert.diffusers import ModelFolderError
from jaxdiff.tokenizer import Tokenizer

COMPONENT_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
}


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """Configs, params and tokenizer of one checkpoint. ``params[name]`` for unet, vae, text_encoder."""

    unet_config: Any
    vae_config: Any
    text_config: Any
    params: dict
    tokenizer: Tokenizer | None
    scheduler_config: dict
    source: str = ""

    @property
    def latent_scale(self) -> int:
        return self.vae_config.downscale


def _check_folder(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ModelFolderError(
            f"{folder}: not a diffusers model folder (model_index.json is missing)"
        )
    index = json.loads(index_path.read_text())
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{folder}: incomplete model folder, missing component folders {missing}"
        )
    return index


def load_pretrained(folder, *, dtype=jnp.float32, variant: str | None = None) -> StableDiffusion:
    """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers folder."""
    folder = Path(folder)
    _check_folder(folder)
    configs, params = {}, {}
    for name in ("unet", "vae", "text_encoder"):
        try:
            configs[name], p = dconv.load_component(
                folder / name, name, dtype=dtype, variant=variant
            )
        except FileNotFoundError as e:
            raise ModelFolderError(f"{folder}: incomplete model folder: {e}") from e
        params[name] = jax.device_put(p)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(sched_path.read_text()) if sched_path.exists() else {}
    tok = Tokenizer(
        folder / "tokenizer", max_length=configs["text_encoder"].max_position_embeddings
    )
    return StableDiffusion(
        configs["unet"],
        configs["vae"],
        configs["text_encoder"],
        params,
        tok,
        scheduler,
        str(folder),
    )


def copy_tokenizer(src, dst):
    """The tokenizer files of ``src`` (a tokenizer folder, or a CLIPModel folder holding one) into ``dst``."""

    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise ModelFolderError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)


def save_pretrained(
    model: StableDiffusion, folder, *, tokenizer_folder=None, overwrite: bool = False
):
    """Write a diffusers folder. Built in a temporary sibling and moved into place at the end, so a
    failure never leaves a half-written model; an existing folder is replaced only with overwrite."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} exists and is not empty; pass overwrite=True to replace it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, cfg in (
            ("unet", model.unet_config),
            ("vae", model.vae_config),
            ("text_encoder", model.text_config),
        ):
            dconv.save_component(tmp / name, name, cfg, model.params[name])
        tok_src = (
            Path(tokenizer_folder)
            if tokenizer_folder
            else (Path(model.source) / "tokenizer" if model.source else None)
        )
        if tok_src is None or not tok_src.is_dir():
            raise ModelFolderError(
                "save_pretrained needs a tokenizer folder to copy (tokenizer_folder=...)"
            )
        copy_tokenizer(tok_src, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        sched = dict(model.scheduler_config) or default_scheduler_config()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            **{k: list(v) for k, v in COMPONENT_CLASSES.items()},
            "scheduler": ["diffusers", sched.get("_class_name", "DDIMScheduler")],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def default_scheduler_config() -> dict:
    """Stable Diffusion 1.x's training schedule (scaled-linear betas, 1000 steps, epsilon)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }

"""A latent-diffusion training run as a model: what the run records beside its checkpoints
(``ldm.json``, ``tokenizer/``) and its export to a diffusers folder (``jaxdiff export``).

``ldm.json`` holds the resolved component configs (diffusers / transformers form, the latent
scaling factor included) and where the frozen parts came from, so a run folder alone says which
model its checkpoints belong to.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert.pretrained import (
    StableDiffusion,
    copy_tokenizer,
    load_pretrained,
    save_pretrained,
)
from jaxdiff.convert.runs import load_clip, load_run_params, load_vae
from jaxdiff.data import pipeline as pl
from jaxdiff.models import clip as clip_lib
from jaxdiff.models.vae import AutoencoderKL

RECORD = "ldm.json"
RANDOM_TEXT = "random"  # model.text_encoder: a new tower, trained with the UNet


def latent_scaling_factor(
    vae_config,
    vae_params,
    source: str,
    resolution: int,
    n: int = 1024,
    seed: int = 0,
    shapes: dict | None = None,
) -> float:
    """1 / std of VAE latents z ~ q(z | x) over the first ``n`` images of ``source`` (opened with the
    ``shapes`` options of ``pl.open_source``; the rule that gave SD 1's 0.18215): scaled latents have unit
    variance, which the noise schedule assumes."""
    src = pl.open_source(source, resolution=resolution, **(shapes or {}))
    decode = pl.DecodeExample(resolution)
    images = []
    for i in range(min(n, len(src))):
        ex = decode(src[i])
        if ex is not None:
            images.append(ex["image"])
    if not images:
        raise ValueError(f"{source}: no readable images to measure the latent scale on")
    x = np.stack(images).astype(np.float32) / 127.5 - 1
    vae = AutoencoderKL(vae_config)
    encode = jax.jit(
        lambda p, x, k: vae.apply({"params": p}, x, method=AutoencoderKL.encode).sample(k)
    )
    z = np.concatenate(
        [
            np.asarray(encode(vae_params, x[i : i + 128], jax.random.key(seed + i)))
            for i in range(0, len(x), 128)
        ]
    )
    shift = vae_config.shift_factor or 0.0
    return float(1.0 / np.std(z - shift))


def write_ldm_record(
    workdir, unet_config, vae_config, text_config, ldm, tokenizer_folder, **sources
):
    """WORKDIR/ldm.json (component configs, scheduler, sources) and WORKDIR/tokenizer/."""

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {
        "unet": dconv.unet_config_to_diffusers(unet_config),
        "vae": dconv.vae_config_to_diffusers(vae_config),
        "text_encoder": dconv.text_config_to_transformers(text_config),
        "scheduler": scheduler_config(ldm),
        "sources": {k: str(v) for k, v in sources.items()},
    }
    if tokenizer_folder is not None:
        copy_tokenizer(tokenizer_folder, workdir / "tokenizer")
    tmp = workdir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(workdir / RECORD)


def scheduler_config(ldm) -> dict:
    """The DDIM scheduler config a trained model samples with (the training schedule, SD 1's defaults;
    a zero-terminal-SNR schedule as Lin et al. 2024 sample it)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": ldm.beta_start,
        "beta_end": ldm.beta_end,
        "beta_schedule": ldm.beta_schedule,
        "num_train_timesteps": ldm.num_train_timesteps,
        "prediction_type": ldm.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": ldm.timestep_spacing,  # (trailing ignores the offset)
        "rescale_betas_zero_snr": ldm.rescale_betas_zero_snr,
    }


def export_ldm(workdir, out, overwrite: bool = False, prefer_ema: bool = True):
    """A latent-diffusion run (its newest checkpoint, EMA if kept) -> a diffusers folder."""

    workdir = Path(workdir)
    rec = json.loads((workdir / RECORD).read_text())
    ucfg = dconv.unet_config_from_diffusers(rec["unet"])
    vcfg = dconv.vae_config_from_diffusers(rec["vae"])
    tcfg = dconv.text_config_from_transformers(rec["text_encoder"])
    unet, step = load_run_params(workdir, prefer_ema=prefer_ema)
    src = rec["sources"]
    base = None
    if src.get("model_dir"):  # a fine-tuned model: its parts unless the run replaced them
        base = load_pretrained(src["model_dir"])
    if not (src.get("vae_workdir") or base) or not (src.get("text_encoder") or base):
        raise ValueError(
            f"{workdir}: export needs a run with a trained VAE (model.vae_workdir) and a CLIP text "
            "encoder (model.text_encoder), or a model.model_dir; this one used random frozen parts"
        )
    if src.get("vae_workdir"):
        _, vae = load_vae(src["vae_workdir"])
    else:
        vae = base.params["vae"]
    if src.get("text_encoder") == RANDOM_TEXT:  # trained from scratch here: the checkpoint holds it
        text_cfg, text = tcfg, None
    elif src.get("text_encoder"):
        ccfg, cparams, _ = load_clip(src["text_encoder"])
        text_cfg, text = clip_lib.text_encoder(ccfg, cparams)
    else:
        text_cfg, text = base.text_config, base.params["text_encoder"]
    if isinstance(unet, dict) and set(unet) == {
        "unet",
        "text_encoder",
    }:  # ldm.train_text_encoder: trained here
        unet, text = unet["unet"], unet["text_encoder"]
    if text is None:
        raise ValueError(
            f"{workdir}: its checkpoints hold no text encoder (model.text_encoder='random' without "
            "ldm.train_text_encoder)"
        )
    if text_cfg != tcfg:
        raise ValueError(
            f"{src.get('text_encoder') or src['model_dir']}: its text tower no longer matches the "
            f"run's ({workdir / RECORD})"
        )
    model = StableDiffusion(
        ucfg, vcfg, tcfg, {"unet": unet, "vae": vae, "text_encoder": text}, None, rec["scheduler"]
    )
    save_pretrained(model, out, tokenizer_folder=workdir / "tokenizer", overwrite=overwrite)
    return step


def export_vae(workdir, out, overwrite: bool = False) -> float:
    """A VAE run -> a diffusers ``AutoencoderKL`` folder whose scaling factor is measured on the run's
    training data (:func:`latent_scaling_factor`); returns the factor."""

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    config, params = load_vae(workdir)
    run = json.loads((Path(workdir) / "config.json").read_text())
    run = run.get("config", run)
    data = run["data"]
    factor = latent_scaling_factor(
        config, params, data["source"], data["resolution"], shapes=data.get("shapes")
    )
    config = dataclasses.replace(
        config, scaling_factor=factor, sample_size=run["data"]["resolution"]
    )
    dconv.save_component(out, "vae", config, params)
    return factor

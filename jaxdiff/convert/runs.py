"""Models out of `jaxdiff train` run folders: the newest checkpoint's params, and a run or exported
folder read as a VAE or a CLIP (what training, export and evaluation all start from)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import orbax.checkpoint as ocp
from etils import epath

from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert.clip import load_clip as load_clip_folder
from jaxdiff.models import clip as clip_lib
from jaxdiff.models.vae import PRESETS as VAE_PRESETS


def load_run_params(workdir, *, prefer_ema: bool = True):
    """The params (or their EMA) of a run's newest checkpoint, as saved; e.g. a trained VAE for an LDM."""
    ckpt = epath.Path(workdir) / "checkpoints"
    ckpt = ckpt if "://" in str(workdir) else epath.Path(os.path.abspath(ckpt))
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{workdir}: no checkpoints folder (is it a `jaxdiff train` workdir?)"
        )
    mngr = ocp.CheckpointManager(ckpt, item_names=("state", "data"))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    params = state["ema"] if prefer_ema and state.get("ema") is not None else state["params"]
    return params, step


def load_vae(path):
    """(VAEConfig, params) of a `jaxdiff train` VAE run (its newest checkpoint; EMA if kept), a diffusers
    model folder (its vae/) or a vae/ component folder. A run that fine-tuned ``model.model_dir`` has
    that model's config (relative paths are read from the working directory, as the run did)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        run = json.loads((path / "config.json").read_text())
        cfg = run.get("config", run)
        if cfg.get("task") != "vae":
            raise ValueError(f"{path}: a {cfg.get('task')!r} run, not a VAE run")
        params, _ = load_run_params(path)
        start = cfg["model"].get("model_dir")  # a fine-tuning run has its starting model's config
        return (load_vae(start)[0] if start else VAE_PRESETS[cfg["model"]["preset"]]), params.get(
            "vae", params
        )
    folder = path / "vae" if (path / "vae").is_dir() else path
    return dconv.load_component(folder, "vae")


def load_clip(path):
    """(CLIPConfig, params, tokenizer folder) of a `jaxdiff train` CLIP workdir (its newest checkpoint)
    or a transformers CLIPModel folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if (path / "clip.json").is_file():
        config = clip_lib.config_from_dict(json.loads((path / "clip.json").read_text()))
        params, _ = load_run_params(path)
        tok_dir = path / "tokenizer"
    elif (path / "config.json").is_file():
        config, params = load_clip_folder(path)
        tok_dir = path
    else:
        raise FileNotFoundError(
            f"{path}: neither a jaxdiff CLIP run (clip.json) nor a transformers CLIPModel "
            "folder (config.json)"
        )
    if not tok_dir.is_dir() or not any(
        (tok_dir / f).is_file() for f in ("vocab.json", "tokenizer.json")
    ):
        raise FileNotFoundError(
            f"{tok_dir}: the model has no tokenizer files (vocab.json and merges.txt)"
        )
    return config, params, tok_dir

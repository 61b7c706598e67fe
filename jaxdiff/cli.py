"""The `jaxdiff` command: txt2img, img2img, convert, export, data, train, eval, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert.clip import save_clip
from jaxdiff.convert.diffusers import UNET_EXTENSIONS, ModelFolderError
from jaxdiff.convert.naming import ConversionError
from jaxdiff.convert.pretrained import StableDiffusion, default_scheduler_config, save_pretrained
from jaxdiff.convert.runs import load_clip
from jaxdiff.convert.single_file import load_single_file
from jaxdiff.runtime import tune_cpu
from jaxdiff.tokenizer import write_clip_tokenizer
from jaxdiff.train.export import export_ldm, export_vae


def _convert(args):
    """Original single-file SD 1.x/2.x checkpoint -> a diffusers folder."""

    src, out = Path(args.checkpoint), Path(args.out)
    if not src.is_file():
        sys.exit(f"jaxdiff convert: {src}: no such file")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"jaxdiff convert: {out} exists and is not empty (pass --overwrite to replace it)")
    configs = {}
    if args.config:  # architectures that the SD 1.x / 2.x conventions cannot infer from shapes
        cfg_dir = Path(args.config)
        for name, key in (
            ("unet", "unet_config"),
            ("vae", "vae_config"),
            ("text_encoder", "text_config"),
        ):
            configs[key] = dconv.COMPONENTS[name].config_from(
                dconv._read_json(cfg_dir / name / "config.json")
            )
    parts = load_single_file(src, **configs)
    text_cfg = parts["text_encoder"][0]
    sched = dict(default_scheduler_config(), prediction_type=args.prediction_type)
    model = StableDiffusion(
        parts["unet"][0],
        parts["vae"][0],
        text_cfg,
        {k: v[1] for k, v in parts.items()},
        None,
        sched,
    )
    with tempfile.TemporaryDirectory() as tmp:
        # SD 2.x (OpenCLIP, gelu) pads prompts with "!", SD 1.x with <|endoftext|>.
        tok = write_clip_tokenizer(
            Path(tmp) / "tokenizer",
            pad_token="!" if text_cfg.hidden_act == "gelu" else "<|endoftext|>",
        )
        save_pretrained(model, out, tokenizer_folder=tok, overwrite=args.overwrite)
    print(f"wrote {out}")


def _export(args):
    """A `jaxdiff train` run -> a standard folder: CLIP -> transformers CLIPModel (weights, config,
    tokenizer); latent diffusion -> a diffusers StableDiffusionPipeline folder."""

    work, out = Path(args.workdir), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"jaxdiff export: {out} exists and is not empty (pass --overwrite to replace it)")
    if (work / "ldm.json").is_file():
        try:
            step = export_ldm(work, out, overwrite=args.overwrite, prefer_ema=not args.raw_params)
        except ValueError as err:
            sys.exit(f"jaxdiff export: {err}")

        unet_cfg = json.loads((out / "unet" / "config.json").read_text())
        ext = [what for _, key, what, _ in UNET_EXTENSIONS if key in unet_cfg]
        only = f" jaxdiff's UNet {' and '.join(ext)}: diffusers cannot load it;" if ext else ""
        print(
            f"wrote {out} (diffusers folder, UNet of step {step};{only} load with Pipeline.from_pretrained "
            "or `jaxdiff txt2img --model`)"
        )
        return
    if (work / "checkpoints").is_dir() and _run_config(work).get("task") == "vae":
        factor = export_vae(work, out, overwrite=args.overwrite)
        print(
            f"wrote {out} (diffusers AutoencoderKL; latent scaling factor {factor:.5f}, measured on the run's data)"
        )
        return
    if not (work / "clip.json").is_file():
        sys.exit(
            f"jaxdiff export: {work} is not a CLIP (clip.json), VAE or latent-diffusion (ldm.json) run"
        )
    config, params, tok_dir = load_clip(work)
    save_clip(out, config, params, tokenizer_folder=tok_dir, drop_logit_bias=args.drop_logit_bias)
    print(
        f"wrote {out} (transformers CLIPModel + tokenizer; load with jaxdiff.convert.clip.load_clip "
        "or CLIPModel.from_pretrained)"
    )


def _run_config(work: Path) -> dict:

    path = work / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# Subcommands that own their argument parsing: name -> (module with `main(argv)`, help line).
DELEGATED = {
    "demo": ("jaxdiff.demo", "draw a labelled prompt grid with the shipped shapes-world model"),
    "txt2img": (
        "jaxdiff.pipelines.generate:main_txt2img",
        "generate images from a prompt (see `jaxdiff txt2img --help`)",
    ),
    "img2img": (
        "jaxdiff.pipelines.generate:main_img2img",
        "edit an image towards a prompt (see `jaxdiff img2img --help`)",
    ),
    "train": ("jaxdiff.train.cli", "train a model (see `jaxdiff train --help`)"),
    "data": ("jaxdiff.data.cli", "build and inspect data sets (see `jaxdiff data --help`)"),
    "eval": ("jaxdiff.eval.cli", "score generated images (see `jaxdiff eval --help`)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tune_cpu()  # before any JAX computation (jaxdiff.runtime says why)
    if argv and argv[0] in DELEGATED:
        module, _, func = DELEGATED[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), func or "main")(argv[1:])
    ap = argparse.ArgumentParser(prog="jaxdiff", description="JAX/Flax text-to-image diffusion.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (_, help_line) in DELEGATED.items():
        sub.add_parser(name, help=help_line)
    c = sub.add_parser("convert", help="original single-file SD checkpoint -> diffusers folder")
    c.add_argument("checkpoint", help="a .safetensors (or .ckpt, read with weights_only=True)")
    c.add_argument("--out", required=True, help="the diffusers folder to write")
    c.add_argument(
        "--prediction-type",
        default="epsilon",
        choices=["epsilon", "v_prediction"],
        help="not stored in single files: v_prediction for SD 2.x 768-px models",
    )
    c.add_argument(
        "--config",
        help="a diffusers folder whose unet/, vae/, text_encoder/ config.json "
        "give the architecture (default: inferred, SD 1.x / 2.x conventions)",
    )
    c.add_argument("--overwrite", action="store_true")
    e = sub.add_parser(
        "export", help="a training run -> a CLIPModel, AutoencoderKL or diffusers SD folder"
    )
    e.add_argument(
        "--workdir", required=True, help="the `jaxdiff train` run (its newest checkpoint)"
    )
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument(
        "--drop-logit-bias", action="store_true", help="export a sigmoid-loss CLIP without its bias"
    )
    e.add_argument(
        "--raw-params",
        action="store_true",
        help="a latent-diffusion run: export the trained params, not their EMA",
    )
    args = ap.parse_args(argv)
    if args.command == "export":
        try:
            _export(args)
        except (FileNotFoundError, ModelFolderError) as err:
            sys.exit(f"jaxdiff export: {err}")
    if args.command == "convert":
        try:
            _convert(args)
        except (ConversionError, ModelFolderError) as e:
            hint = (
                ""
                if args.config
                else (
                    "\n(an architecture other than SD 1.x / 2.x? pass --config "
                    "with a diffusers folder that describes it)"
                )
            )
            sys.exit(f"jaxdiff convert: {e}{hint}")


if __name__ == "__main__":
    main()

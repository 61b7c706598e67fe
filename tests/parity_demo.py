"""The loading and parity demo: a small *random-weight* diffusers Stable Diffusion checkpoint (there is
no model hub here), loaded with jaxdiff and run beside diffusers' PyTorch models.

    python tests/parity_demo.py [--out out/parity] [--prompt TEXT] [--seed 0]

It compares the text encoder, a UNet call, the VAE decoder and a whole txt2img run (20 DPM-Solver++
steps, CFG 7.5) with diffusers, writes images with `jaxdiff txt2img` and exports the weights back to a
diffusers folder that diffusers reloads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import reference as ref
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from jaxdiff.convert.pretrained import load_pretrained, save_pretrained
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL, unscale_latents
from jaxdiff.pipelines import generate
from jaxdiff.pipelines.stable_diffusion import Pipeline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/parity", help="where the checkpoints and images go")
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--seed", type=int, default=0)
    return parity(ap.parse_args(argv))


def parity(args):
    """Build, load, compare, generate, export: each stage printed with its numbers."""
    out = Path(args.out)
    folder = out / "tiny-sd-random"
    t0 = time.time()
    if folder.exists():
        shutil.rmtree(folder)
    print(f"[1/5] building a random-weight diffusers StableDiffusionPipeline in {folder} ...")
    pipe = ref.make_pipeline_folder(
        folder, unet=ref.UNET_SD2, vae=ref.VAE_SMALL, text=ref.TEXT_SD1, seed=args.seed
    )

    print("[2/5] loading it with jaxdiff.convert.pretrained.load_pretrained ...")
    model = load_pretrained(folder)
    n = sum(x.size for x in jax.tree.leaves(model.params))
    print(
        f"      {n:,} params; UNet blocks {model.unet_config.block_out_channels}, "
        f"text width {model.text_config.hidden_size}, latent x{model.latent_scale}"
    )

    print(f"[3/5] prompt {args.prompt!r} through both stacks ...")
    ids = model.tokenizer([args.prompt])
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ctx = pipe.text_encoder(torch.tensor(ids, dtype=torch.long))[0]
        eps = pipe.unet(latents, 500, ctx).sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    jctx = jax.jit(TextTransformer(model.text_config).apply)(
        {"params": model.params["text_encoder"]}, ids
    )["last_hidden_state"]
    jeps = jax.jit(UNet(model.unet_config).apply)(
        {"params": model.params["unet"]}, ref.nhwc(latents), 500, jctx
    )
    vae = AutoencoderKL(model.vae_config)
    jimg = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(
        model.params["vae"], unscale_latents(ref.nhwc(latents), model.vae_config)
    )
    rows = [
        ("text encoder hidden states", np.asarray(jctx), ctx.numpy()),
        ("UNet noise prediction", ref.nchw(jeps), eps.numpy()),
        ("VAE decoded image", ref.nchw(jimg), image.numpy()),
    ]
    print(f"      {'output':28s} {'shape':>18s} {'max |diff|':>11s} {'max |value|':>12s}")
    for name, a, b in rows:
        print(
            f"      {name:28s} {str(a.shape):>18s} {np.abs(a - b).max():11.2e} {np.abs(b).max():12.3f}"
        )

    print(
        f"[4/5] txt2img: {args.prompt!r}, 20 dpm++2m steps, CFG 7.5, same initial latents as diffusers ..."
    )
    tpipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    tpipe.scheduler = DPMSolverMultistepScheduler.from_config(dict(model.scheduler_config))
    tpipe.set_progress_bar_config(disable=True)
    size = model.unet_config.sample_size * model.latent_scale * 2
    lat = torch.randn(1, 4, size // model.latent_scale, size // model.latent_scale, generator=g)
    want = tpipe(
        args.prompt,
        num_inference_steps=20,
        guidance_scale=7.5,
        latents=lat,
        height=size,
        width=size,
        output_type="np",
    ).images
    got = Pipeline.from_model(model).txt2img(
        args.prompt,
        steps=20,
        guidance=7.5,
        sampler="dpm++2m",
        latents=lat.numpy(),
        height=size,
        width=size,
    )
    psnr = 10 * np.log10(1 / max(float(np.mean((got - want) ** 2)), 1e-30))
    print(
        f"      {size}x{size} image: max |diff| {np.abs(got - want).max():.2e}, PSNR {psnr:.1f} dB vs diffusers"
    )
    paths = generate.run(
        "txt2img",
        [
            "--model",
            str(folder),
            "--prompt",
            args.prompt,
            "--steps",
            "20",
            "--sampler",
            "dpm++2m",
            "--num-images",
            "2",
            "--seed",
            str(args.seed),
            "--height",
            str(size),
            "--width",
            str(size),
            "--out",
            str(out / "images"),
            "--no-progress",
        ],
    )
    print(
        f"      `jaxdiff txt2img` wrote {', '.join(str(p) for p in paths)} (parameters in the PNG text)"
    )

    export = out / "tiny-sd-exported"
    print(f"[5/5] exporting jaxdiff's params back to a diffusers folder: {export}")
    save_pretrained(model, export, overwrite=True)
    back = StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None)
    a, b = pipe.unet.state_dict(), back.unet.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"      diffusers reloads it; UNet weights identical to the original: {same}")
    print(
        f"done in {time.time() - t0:.0f} s. Random weights: this demo proves loading, sampling and parity, "
        "not image quality (`make demo` draws a prompt grid with the trained shapes-world model)."
    )


if __name__ == "__main__":
    sys.exit(main())

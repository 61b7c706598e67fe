"""`make demo`: the shapes-world Stable Diffusion trained by jaxdiff draws a labelled grid of prompts.

    python -m jaxdiff.demo [--out out/demo] [--guidance W] [--steps 25]     # the grid (default)
    python -m jaxdiff.demo --parity                                         # loading + parity vs diffusers

The grid: a few prompts (two of them name colour-shape pairs that training never showed), four
seeds each, generated with the committed model in models/shapes_sd (no download), each image marked
by the shapes-world evaluator as correct or not. `--parity` builds a small *random-weight* diffusers
checkpoint, loads it with jaxdiff, compares the text encoder, a UNet call, the VAE decoder and a
whole txt2img run (20 DPM-Solver++ steps, CFG 7.5) with diffusers' PyTorch models, writes images with
`jaxdiff txt2img` and exports the weights back to a diffusers folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)

import jax
import numpy as np


GRID_PROMPTS = ("a red circle", "a large blue star in the top left", "two green squares",
                "a yellow triangle above a purple cross", "a pink diamond on a white background",
                "three cyan crosses", "a red star", "an orange circle")       # the last two: held-out pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo", help="where the images (and the parity demo's checkpoints) go")
    ap.add_argument("--parity", action="store_true", help="the random-weight parity demo against diffusers")
    ap.add_argument("--model", default=None, help="grid: a diffusers folder (default: models/shapes_sd)")
    ap.add_argument("--prompt", action="append", help="grid: prompts (repeatable); parity: the one prompt")
    ap.add_argument("--guidance", type=float, default=None,
                    help="grid: default the model's jaxdiff_sampling.json, else 3")
    ap.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                    help="grid: guide only the steps with LO <= t/T <= HI (default: the model's jaxdiff_sampling.json, "
                         "else every step)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=4, help="grid: images per prompt (seeds 0 .. n-1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return parity(args) if args.parity else grid(args)


def grid(args):
    """Generate the labelled grid with the shipped shapes-world model and say where it went."""
    from PIL import Image, ImageDraw

    from jaxdiff.eval.fidelity import score
    from jaxdiff.generate import DEFAULT_MODEL, model_sampling_defaults
    from jaxdiff.pipeline import Pipeline, check_interval
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model / "model_index.json").is_file():
        if args.model:
            sys.exit(f"demo: {model} is not a diffusers model folder (no model_index.json)")
        print(f"demo: no trained shapes-world model in {model} yet (`make shapes-sd` makes one); "
              "running the parity demo instead", flush=True)
        return parity(args)
    prompts = list(args.prompt or GRID_PROMPTS)
    own = model_sampling_defaults(model)
    guidance = args.guidance if args.guidance is not None else own.get("guidance", 3.0)
    interval = args.guidance_interval.split(",") if args.guidance_interval else own.get("guidance_interval")
    try:
        interval = check_interval(interval)
    except ValueError as e:
        sys.exit(f"demo: --guidance-interval: {e}")
    t0 = time.time()
    pipe = Pipeline.from_pretrained(model)
    print(f"model {model}: generating {len(prompts)} prompts x {args.seeds} seeds, DDIM {args.steps} steps, "
          f"guidance {guidance:g}" + (f" for t / T in [{interval[0]:g}, {interval[1]:g}]" if interval else "")
          + " ...", flush=True)
    images = pipe.txt2img(prompts, num_images=args.seeds, steps=args.steps, guidance=guidance,
                          guidance_interval=interval, sampler="ddim", seed=args.seed, progress=True)
    images = np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)
    cell, label_w = 128, 260
    sheet = Image.new("RGB", (label_w + args.seeds * (cell + 4), len(prompts) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    correct = 0
    for r, prompt in enumerate(prompts):
        y = r * (cell + 4)
        marks = []
        for c in range(args.seeds):
            img = images[r * args.seeds + c]
            ok = _score_or_none(score, img, prompt)
            correct += bool(ok)
            marks.append("-" if ok is None else ("ok" if ok else "x"))
            sheet.paste(Image.fromarray(img).resize((cell, cell), Image.Resampling.NEAREST),
                        (label_w + c * (cell + 4), y))
        draw.text((8, y + cell // 2 - 12), prompt, fill="black")
        draw.text((8, y + cell // 2 + 4), "evaluator: " + " ".join(marks), fill="gray")
        print(f"  {prompt:45s} {' '.join(marks)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shapes_grid.png"
    tmp = path.with_name(".shapes_grid.png.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    print(f"wrote {path}: {len(images)} images, {correct} judged correct by the shapes-world evaluator "
          f"({time.time() - t0:.0f} s)")


def _score_or_none(score, img, prompt):
    try:
        return score(img, prompt)["correct"]
    except ValueError:            # not a shapes-world caption: nothing to check
        return None


def parity(args):
    args.prompt = (args.prompt or ["a photo of a cat"])[0]
    try:
        import torch
        from jaxdiff import reference as ref
    except ImportError:
        sys.exit("the demo compares against diffusers: install the test extra (make demo does)")
    import shutil

    from jaxdiff.pretrained import load_pretrained, save_pretrained
    from jaxdiff.text import TextTransformer
    from jaxdiff.unet import UNet
    from jaxdiff.vae import AutoencoderKL, unscale_latents

    out = Path(args.out)
    folder = out / "tiny-sd-random"
    t0 = time.time()
    if folder.exists():
        shutil.rmtree(folder)
    print(f"[1/5] building a random-weight diffusers StableDiffusionPipeline in {folder} ...")
    pipe = ref.make_pipeline_folder(folder, unet=ref.UNET_SD2, vae=ref.VAE_SMALL, text=ref.TEXT_SD1,
                                    seed=args.seed)

    print("[2/5] loading it with jaxdiff.pretrained.load_pretrained ...")
    model = load_pretrained(folder)
    n = sum(x.size for x in jax.tree.leaves(model.params))
    print(f"      {n:,} params; UNet blocks {model.unet_config.block_out_channels}, "
          f"text width {model.text_config.hidden_size}, latent x{model.latent_scale}")

    print(f"[3/5] prompt {args.prompt!r} through both stacks ...")
    ids = model.tokenizer([args.prompt])
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ctx = pipe.text_encoder(torch.tensor(ids, dtype=torch.long))[0]
        eps = pipe.unet(latents, 500, ctx).sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    jctx = jax.jit(TextTransformer(model.text_config).apply)(
        {"params": model.params["text_encoder"]}, ids)["last_hidden_state"]
    jeps = jax.jit(UNet(model.unet_config).apply)({"params": model.params["unet"]},
                                                   ref.nhwc(latents), 500, jctx)
    vae = AutoencoderKL(model.vae_config)
    jimg = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(
        model.params["vae"], unscale_latents(ref.nhwc(latents), model.vae_config))
    rows = [("text encoder hidden states", np.asarray(jctx), ctx.numpy()),
            ("UNet noise prediction", ref.nchw(jeps), eps.numpy()),
            ("VAE decoded image", ref.nchw(jimg), image.numpy())]
    print(f"      {'output':28s} {'shape':>18s} {'max |diff|':>11s} {'max |value|':>12s}")
    for name, a, b in rows:
        print(f"      {name:28s} {str(a.shape):>18s} {np.abs(a - b).max():11.2e} {np.abs(b).max():12.3f}")

    print(f"[4/5] txt2img: {args.prompt!r}, 20 dpm++2m steps, CFG 7.5, same initial latents as diffusers ...")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from jaxdiff import generate
    from jaxdiff.pipeline import Pipeline
    tpipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    tpipe.scheduler = DPMSolverMultistepScheduler.from_config(dict(model.scheduler_config))
    tpipe.set_progress_bar_config(disable=True)
    size = model.unet_config.sample_size * model.latent_scale * 2
    lat = torch.randn(1, 4, size // model.latent_scale, size // model.latent_scale, generator=g)
    want = tpipe(args.prompt, num_inference_steps=20, guidance_scale=7.5, latents=lat, height=size, width=size,
                 output_type="np").images
    got = Pipeline.from_model(model).txt2img(args.prompt, steps=20, guidance=7.5, sampler="dpm++2m",
                                             latents=lat.numpy(), height=size, width=size)
    psnr = 10 * np.log10(1 / max(float(np.mean((got - want) ** 2)), 1e-30))
    print(f"      {size}x{size} image: max |diff| {np.abs(got - want).max():.2e}, PSNR {psnr:.1f} dB vs diffusers")
    paths = generate.run("txt2img", ["--model", str(folder), "--prompt", args.prompt, "--steps", "20",
                                     "--sampler", "dpm++2m", "--num-images", "2", "--seed", str(args.seed),
                                     "--height", str(size), "--width", str(size), "--out", str(out / "images"),
                                     "--no-progress"])
    print(f"      `jaxdiff txt2img` wrote {', '.join(str(p) for p in paths)} (parameters in the PNG text)")

    export = out / "tiny-sd-exported"
    print(f"[5/5] exporting jaxdiff's params back to a diffusers folder: {export}")
    save_pretrained(model, export, overwrite=True)
    back = StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None)
    a, b = pipe.unet.state_dict(), back.unet.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"      diffusers reloads it; UNet weights identical to the original: {same}")
    print(f"done in {time.time() - t0:.0f} s. Random weights: this demo proves loading, sampling and parity, "
          "not image quality (once models/shapes_sd is trained, see docs/shapes_sd.md, `make demo` draws a "
          "prompt grid with it).")


if __name__ == "__main__":
    main()

"""`make demo`: the shapes-world Stable Diffusion trained by jaxdiff draws a labelled grid of prompts.

    jaxdiff demo [--out out/demo] [--guidance W] [--steps 25]

The grid: a few prompts (two of them name colour-shape pairs that training never showed), four
seeds each, generated with the committed model in models/shapes_sd (no download), each image marked
by the shapes-world evaluator as correct or not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxdiff.eval.fidelity import score
from jaxdiff.pipelines.generate import default_model, model_sampling_defaults, no_model_message
from jaxdiff.pipelines.params import SamplingError, SamplingParams, parse_interval
from jaxdiff.pipelines.stable_diffusion import Pipeline
from jaxdiff.runtime import tune_cpu

GRID_PROMPTS = (
    "a red circle",
    "a large blue star in the top left",
    "two green squares",
    "a yellow triangle above a purple cross",
    "a pink diamond on a white background",
    "three cyan crosses",
    "a red star",
    "an orange circle",
)  # the last two: held-out pairs
GUIDANCE_KEYS = ("guidance", "guidance_rescale", "guidance_interval")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default="out/demo", help="where the images (and the parity demo's checkpoints) go"
    )
    ap.add_argument(
        "--model", default=None, help="grid: a diffusers folder (default: models/shapes_sd)"
    )
    ap.add_argument(
        "--prompt", action="append", help="grid: prompts (repeatable); parity: the one prompt"
    )
    ap.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="grid: default the model's jaxdiff_sampling.json, else 3",
    )
    ap.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO,HI",
        help="grid: guide only the steps with LO <= t/T <= HI (default: the model's jaxdiff_sampling.json, "
        "else every step)",
    )
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=4, help="grid: images per prompt (seeds 0 .. n-1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return grid(args)


def grid(args):
    """Generate the labelled grid with the shipped shapes-world model and say where it went."""

    if not args.model and default_model() is None:
        sys.exit(f"demo: {no_model_message()}")
    model = Path(args.model) if args.model else default_model()
    if not (model / "model_index.json").is_file():
        sys.exit(f"demo: {model} is not a diffusers model folder (no model_index.json)")
    prompts = list(args.prompt or GRID_PROMPTS)
    # the demo's DDIM and steps, the model's guidance settings (its jaxdiff_sampling.json), then flags
    own = {k: v for k, v in model_sampling_defaults(model).items() if k in GUIDANCE_KEYS}
    try:
        params = SamplingParams(
            steps=args.steps, guidance=3.0, sampler="ddim", seed=args.seed, num_images=args.seeds
        ).replace(**own)
        if args.guidance is not None:
            params = params.replace(guidance=args.guidance)
        if args.guidance_interval:
            params = params.replace(guidance_interval=parse_interval(args.guidance_interval))
    except SamplingError as e:
        sys.exit(f"demo: {e}")
    interval = params.guidance_interval
    t0 = time.time()
    pipe = Pipeline.from_pretrained(model)
    print(
        f"model {model}: generating {len(prompts)} prompts x {args.seeds} seeds, DDIM {args.steps} steps, "
        f"guidance {params.guidance:g}"
        + (f" for t / T in [{interval[0]:g}, {interval[1]:g}]" if interval else "")
        + " ...",
        flush=True,
    )
    images = pipe.txt2img(prompts, params=params, progress=True)
    images = np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)
    cell, label_w = 128, 260
    sheet = Image.new(
        "RGB", (label_w + args.seeds * (cell + 4), len(prompts) * (cell + 4)), "white"
    )
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
            sheet.paste(
                Image.fromarray(img).resize((cell, cell), Image.Resampling.NEAREST),
                (label_w + c * (cell + 4), y),
            )
        draw.text((8, y + cell // 2 - 12), prompt, fill="black")
        draw.text((8, y + cell // 2 + 4), "evaluator: " + " ".join(marks), fill="gray")
        print(f"  {prompt:45s} {' '.join(marks)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shapes_grid.png"
    tmp = path.with_name(".shapes_grid.png.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    print(
        f"wrote {path}: {len(images)} images, {correct} judged correct by the shapes-world evaluator "
        f"({time.time() - t0:.0f} s)"
    )


def _score_or_none(score, img, prompt):
    try:
        return score(img, prompt)["correct"]
    except ValueError:  # not a shapes-world caption: nothing to check
        return None


if __name__ == "__main__":
    tune_cpu()
    main()

"""`jaxdiff txt2img` and `jaxdiff img2img`: PNGs that carry their own generation parameters.

    jaxdiff txt2img --model DIR --prompt "a red circle" --steps 20 --out out/
    jaxdiff img2img --model DIR --image photo.png --strength 0.6 --prompt "..." --out out/
    jaxdiff txt2img --from-png out/00000-0.png --out again/        # regenerate an image from itself

Every request is checked (model folder, sizes, sampler, strength, image) before weights are read or
anything is compiled; images are written atomically and never over existing files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from jaxdiff.convert.diffusers import ModelFolderError
from jaxdiff.diffusion.schedules import SAMPLERS, ScheduleError, resolve
from jaxdiff.pipelines.params import FIELDS, SamplingError, SamplingParams, parse_interval
from jaxdiff.pipelines.stable_diffusion import GenerationError, Pipeline, seeds_for

# A PNG's `jaxdiff` chunk: these, and the fields of the SamplingParams it was made with
REQUEST_KEYS = ("mode", "prompt", "negative_prompt", "model", "source_image")


def _parser(mode: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"jaxdiff {mode}",
        description=(
            "Generate images from a prompt"
            if mode == "txt2img"
            else "Edit an image towards a prompt (SDEdit: noise it to --strength, then denoise)"
        ),
    )
    ap.add_argument(
        "--model",
        help="a diffusers Stable Diffusion folder (model_index.json, unet/, vae/ ...); "
        "default: the shapes-world model in models/shapes_sd",
    )
    ap.add_argument("--prompt", help="what to draw")
    ap.add_argument(
        "--negative-prompt", default=None, help="what to steer away from (default: empty)"
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps (default* {SamplingParams.steps}; a default marked * "
        "comes from the model's jaxdiff_sampling.json when it has one)",
    )
    ap.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale w (default* {SamplingParams.guidance:g}; "
        "1 = conditional only, 0 = unconditional only)",
    )
    ap.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="Lin et al.'s rescale, 0..1 (default* 0)",
    )
    ap.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO,HI",
        help="guide only the steps with LO <= t/T <= HI (fractions of the schedule's timesteps); the "
        "others run the conditional model alone (default*: every step)",
    )
    ap.add_argument(
        "--sampler",
        default=None,
        help=f"{', '.join(SAMPLERS)} (default*: the checkpoint's scheduler)",
    )
    ap.add_argument("--eta", type=float, default=None, help="DDIM's eta (default* 0)")
    ap.add_argument(
        "--clip-skip", type=int, default=None, help="condition on the text encoder's layer -1-k"
    )
    ap.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default 0)")
    ap.add_argument("--num-images", type=int, default=None, help="images per prompt (default 1)")
    ap.add_argument(
        "--height",
        type=int,
        default=None,
        help="pixels, a multiple of 8 (default: the model's size)",
    )
    ap.add_argument("--width", type=int, default=None)
    if mode == "img2img":
        ap.add_argument("--image", help="the image to edit (PNG/JPEG...)")
        ap.add_argument(
            "--strength",
            type=float,
            default=None,
            help="0 keeps the image, 1 ignores it (default 0.8)",
        )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument(
        "--from-png",
        help="read every parameter from a PNG this command wrote; flags given override",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--out", required=True, help="folder for the PNGs (created; existing files are kept)"
    )
    return ap


# The model used without --model: the shapes-world Stable Diffusion trained by jaxdiff, shipped in the
# repository (models/shapes_sd). A wheel holds no weights: $JAXDIFF_MODEL, then the checkout jaxdiff runs
# from, then ./models/shapes_sd.
DEFAULT_MODEL_ENV = "JAXDIFF_MODEL"
SHIPPED_MODEL = Path("models") / "shapes_sd"


def default_model_candidates() -> list[Path]:
    """Where a model is looked for when none is given, in order."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    root = (
        Path(__file__).resolve().parents[2]
    )  # a source checkout (an editable install), not site-packages
    checkout = [root / SHIPPED_MODEL] if (root / "pyproject.toml").is_file() else []
    return ([Path(env)] if env else []) + checkout + [Path.cwd() / SHIPPED_MODEL]


def default_model() -> Path | None:
    return next((p for p in default_model_candidates() if (p / "model_index.json").is_file()), None)


def no_model_message() -> str:
    looked = ", ".join(str(p) for p in default_model_candidates())
    return (
        f"no --model given and no default model found (looked in {looked}): pass --model DIR, a diffusers "
        f"Stable Diffusion folder (a jaxdiff clone ships one in {SHIPPED_MODEL}), or set {DEFAULT_MODEL_ENV}=DIR"
    )


# A model folder may carry the sampling settings it was measured with (diffusers ignores the file): any
# SamplingParams fields; they replace the defaults for that model, and --from-png and flags replace them.
SAMPLING_FILE = "jaxdiff_sampling.json"


def model_sampling_defaults(folder) -> dict:
    """The sampling settings a model folder recommends (its jaxdiff_sampling.json), checked; {} if none."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"jaxdiff: cannot read {path}: {e}") from None
    try:
        params = SamplingParams.from_dict(saved)
    except SamplingError as e:
        raise SystemExit(f"jaxdiff: {path}: {e}") from None
    return {k: getattr(params, k) for k in saved}


def read_png_parameters(path) -> dict:
    """The generation parameters a jaxdiff PNG carries (its `jaxdiff` text chunk)."""

    try:
        with Image.open(path) as im:
            text = dict(im.text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"jaxdiff: cannot read {path}: {e}") from None
    if "jaxdiff" not in text:
        raise SystemExit(f"jaxdiff: {path} carries no jaxdiff generation parameters")
    return json.loads(text["jaxdiff"])


def _fail(mode, msg):
    raise SystemExit(f"jaxdiff {mode}: {msg}")


def _as_flag(e: SamplingError) -> str:
    """A SamplingError about a flag's value, said of the flag: "--num-images must be at least 1"."""
    if e.field is None:
        return str(e)
    flag, text = "--" + e.field.replace("_", "-"), str(e)
    return flag + text[len(e.field) :] if text.startswith(e.field + " ") else f"{flag}: {text}"


def _resolve(mode: str, args) -> dict:
    """The run, one dict: the request (model, prompt, image, out ...) and under "params" one checked
    SamplingParams: the defaults <- the model's jaxdiff_sampling.json <- --from-png <- flags."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    flags = {k: given.pop(k) for k in FIELDS if k in given}
    request, png = {"negative_prompt": None}, {}
    if args.from_png:
        saved = read_png_parameters(args.from_png)
        if saved.get("mode") != mode:
            _fail(mode, f"{args.from_png} was made by `jaxdiff {saved.get('mode')}`")
        request.update({k: saved[k] for k in ("prompt", "negative_prompt", "model") if k in saved})
        if "source_image" in saved:
            request["image"] = saved["source_image"]
        png = {k: v for k, v in saved.items() if k not in REQUEST_KEYS}
    request.update(given)
    if not request.get("model") and default_model():
        request["model"] = str(default_model())
    own = {}
    if request.get("model") and Path(request["model"]).is_dir():
        own = model_sampling_defaults(request["model"])
    params = SamplingParams().replace(**own)
    try:
        params = SamplingParams.from_dict(png, base=params)
    except SamplingError as e:
        _fail(mode, f"{args.from_png}: {e}")
    try:
        if "guidance_interval" in flags:
            flags["guidance_interval"] = parse_interval(flags["guidance_interval"])
        params = params.replace(**flags)
    except SamplingError as e:
        _fail(mode, _as_flag(e))
    return dict(request, params=params)


def _check(mode: str, p: dict) -> None:
    """Everything about the request that can be checked without loading weights (the sampling
    settings were checked when they were made)."""

    if not p.get("model"):
        _fail(mode, no_model_message())
    for key in ("prompt",) + (("image",) if mode == "img2img" else ()):
        if not p.get(key):
            _fail(mode, f"--{key} is required")
    folder = Path(p["model"])
    if not folder.is_dir():
        _fail(mode, f"{folder}: no such model folder")
    if not (folder / "model_index.json").exists():
        _fail(mode, f"{folder}: not a diffusers model folder (model_index.json is missing)")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()]
    if missing:
        _fail(mode, f"{folder}: incomplete model folder, missing {', '.join(missing)}")


def _load_image(mode: str, path, height, width) -> np.ndarray:

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        _fail(mode, f"cannot read image {path}: {e}")
    w, h = im.size
    tw, th = width or (w // 8) * 8, height or (h // 8) * 8
    if tw < 8 or th < 8:
        _fail(mode, f"image {path} is too small ({w}x{h})")
    if (tw, th) != (w, h):
        print(f"resizing {path} from {w}x{h} to {tw}x{th}", file=sys.stderr)
        im = im.resize((tw, th), Image.LANCZOS)
    return np.asarray(im, np.float32) / 255.0


def _next_index(out: Path) -> int:
    taken = [int(f.name.split("-")[0]) for f in out.glob("*.png") if f.name.split("-")[0].isdigit()]
    return max(taken, default=-1) + 1


def save_png(path: Path, image: np.ndarray, params: dict) -> None:
    """uint8 PNG with the parameters as text chunks (and all of them as JSON under `jaxdiff`)."""

    info = PngInfo()
    for k, v in params.items():
        if v is not None:
            info.add_text(k, str(v))
    info.add_text("jaxdiff", json.dumps(params))
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
        tmp, format="PNG", pnginfo=info
    )
    os.replace(tmp, path)


def run(mode: str, argv=None) -> list[Path]:
    args = _parser(mode).parse_args(argv)
    p = _resolve(mode, args)
    _check(mode, p)
    params: SamplingParams = p["params"]
    image = (
        _load_image(mode, p["image"], params.height, params.width) if mode == "img2img" else None
    )
    out = Path(p["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(mode, f"cannot create {out}: {e}")

    t0 = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(
            p["model"], dtype=jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
        )
        kw = dict(params=params, progress=not p["no_progress"])
        if mode == "txt2img":
            images = pipe.txt2img(p["prompt"], p["negative_prompt"], **kw)
        else:
            images = pipe.img2img(image, p["prompt"], p["negative_prompt"], **kw)
    except (GenerationError, ScheduleError, ModelFolderError, ValueError) as e:
        _fail(mode, str(e))

    # each PNG regenerates alone: its own seed, one image, the sampler and size actually used
    sampler = resolve(pipe.model.scheduler_config, params.sampler).sampler
    h, w = images.shape[1:3]
    first, paths = _next_index(out), []
    for i, (img, seed) in enumerate(zip(images, seeds_for(params.seed, len(images)))):
        own = params.replace(seed=seed, num_images=1, sampler=sampler, height=h, width=w).to_dict()
        if mode == "txt2img":
            del own["strength"]
        meta = dict(
            mode=mode,
            prompt=p["prompt"],
            negative_prompt=p["negative_prompt"],
            **own,
            model=str(Path(p["model"]).resolve()),
        )
        if mode == "img2img":
            meta["source_image"] = str(Path(p["image"]).resolve())
        path = out / f"{first + i:05d}-{seed}.png"
        save_png(path, img, meta)
        paths.append(path)
    print(
        f"wrote {len(paths)} image(s) to {out} ({time.perf_counter() - t0:.1f} s, compile included)"
    )
    return paths


def main_txt2img(argv=None):
    run("txt2img", argv)


def main_img2img(argv=None):
    run("img2img", argv)

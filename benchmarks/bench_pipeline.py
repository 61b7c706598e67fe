"""Full txt2img against diffusers' StableDiffusionPipeline, identical random weights, one process.

    python benchmarks/bench.py txt2img [--preset sd15] [--size 512] [--steps 20] [--sampler euler]
                                    [--guidance 7.5] [--repeats 1] [--no-torch] [--out FILE.json]

Both sides get the same sd15-architecture pipeline (UNet, VAE, CLIP text encoder built by diffusers /
transformers with seeded random weights, converted by jaxdiff's production converter), the same prompt
and negative prompt, the same initial latents, and CFG at the given scale: one image per call, i.e.
a UNet batch of 2 per step. jaxdiff's first call is compile + run (``compile_s`` is that minus a
warm run); torch gets one warm-up call. Then calls alternate jaxdiff / torch, each timed to the
decoded image, and the JSON records every time, the other processes' CPU use during each call, and
the PSNR between the two images.
"""

from __future__ import annotations

import statistics
import time

import bench as B
import numpy as np

COLUMNS = (
    "date",
    "benchmark",
    "preset",
    "shape",
    "dtype",
    "jaxdiff s/image",
    "torch s/image",
    "ratio",
    "compile s",
    "machine",
    "notes",
)


def _text_config_sd15() -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=49407,
        bos_token_id=49406,
        pad_token_id=49407,
    )


def build(args, tok_dir):
    """diffusers' pipeline with seeded random weights, and jaxdiff's StableDiffusion from its tensors."""
    import diffusers
    import jax.numpy as jnp
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxdiff.convert import diffusers as dconv
    from jaxdiff.convert.pretrained import StableDiffusion, default_scheduler_config
    from jaxdiff.diffusion.schedules import SAMPLER_TO_CLASS
    from jaxdiff.models import unet as unet_lib
    from jaxdiff.models import vae as vae_lib
    from jaxdiff.tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    ucfg, vcfg = unet_lib.PRESETS[args.preset], vae_lib.PRESETS[args.preset]
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    unet = diffusers.UNet2DConditionModel.from_config(
        strip(dconv.unet_config_to_diffusers(ucfg))
    ).eval()
    vae = diffusers.AutoencoderKL.from_config(strip(dconv.COMPONENTS["vae"].config_to(vcfg))).eval()
    text = CLIPTextModel(CLIPTextConfig(**_text_config_sd15())).eval()
    sched_cfg = default_scheduler_config()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet,
        scheduler=getattr(diffusers, SAMPLER_TO_CLASS[args.sampler]).from_config(
            sched_cfg, use_karras_sigmas=args.sampler == "dpm++2m_karras"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    params = {}
    for name, module, cfg in (
        ("unet", unet, ucfg),
        ("vae", vae, vcfg),
        ("text_encoder", text, dconv.COMPONENTS["text_encoder"].config_from(text.config.to_dict())),
    ):
        state = {k: v.numpy() for k, v in module.state_dict().items()}
        params[name] = dconv.params_from_state_dict(name, cfg, state, dtype=jnp.float32)
        if name == "text_encoder":
            text_cfg = cfg
    model = StableDiffusion(
        ucfg, vcfg, text_cfg, params, Tokenizer(tok_dir), sched_cfg, "random sd15"
    )
    return pipe, model


def bench_txt2img(args) -> dict:
    import tempfile
    from pathlib import Path

    import torch

    from jaxdiff.pipelines.stable_diffusion import Pipeline
    from jaxdiff.tokenizer import write_clip_tokenizer

    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    f = 8
    lat = (
        np.random.default_rng(args.seed)
        .standard_normal((1, 4, args.size // f, args.size // f))
        .astype(np.float32)
    )
    result = {
        "benchmark": "txt2img",
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "sampler": args.sampler,
        "guidance": args.guidance,
        "batch": 1,
        "dtype": "float32",
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "tokenizer")
        B.log("building diffusers' sd15 pipeline (random weights) and converting it")
        pipe, model = build(args, tok)
    jpipe = Pipeline.from_model(model)
    kw = dict(
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        height=args.size,
        width=args.size,
    )

    def run_jax():
        return jpipe.txt2img(prompt, negative, latents=lat, **kw)

    def run_torch():
        with torch.inference_mode():
            return pipe(
                prompt,
                negative_prompt=negative,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.size,
                width=args.size,
                latents=torch.from_numpy(lat),
                output_type="np",
            ).images

    B.log("jaxdiff: first call (trace, compile, run)")
    t0 = time.perf_counter()
    jimg = run_jax()
    first = time.perf_counter() - t0
    jt, jo, tt, to = [], [], [], []
    timg = None
    if not args.no_torch:
        B.log("torch: warm-up call")
        t0 = time.perf_counter()
        timg = run_torch()
        result["torch_warmup_s"] = time.perf_counter() - t0
        B.log(f"torch warm-up {result['torch_warmup_s']:.1f}s")
    for i in range(args.repeats):
        t, o = B.timed(run_jax)
        jt.append(t), jo.append(o)
        msg = f"  {i + 1}/{args.repeats}: jaxdiff {t:.1f}s/image (other procs {o:.2f} cores)"
        if not args.no_torch:
            t, o = B.timed(run_torch)
            tt.append(t), to.append(o)
            msg += f", torch {t:.1f}s/image (other procs {o:.2f} cores)"
        B.log(msg)
    result["jaxdiff"] = {
        "first_call_s": first,
        "compile_s": first - statistics.median(jt),
        "time_s": B._stats(jt),
        "other_cpu_cores": jo,
    }
    if timg is not None:
        mse = float(np.mean((jimg.astype(np.float64) - timg) ** 2))
        result["torch"] = {"time_s": B._stats(tt), "other_cpu_cores": to}
        result["ratio"] = statistics.median(jt) / statistics.median(tt)
        result["ratio_pairs_median"] = statistics.median(a / b for a, b in zip(jt, tt))
        result["check"] = {
            "psnr_db": 10 * np.log10(1 / max(mse, 1e-30)),
            "max_abs_diff": float(np.abs(jimg - timg).max()),
        }
        B.log(f"image PSNR jaxdiff vs torch: {result['check']['psnr_db']:.1f} dB")
    result["rss_peak_process"] = B._maxrss()
    return result


def table_row(r: dict) -> dict:
    spread = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"  # noqa: E731
    return {
        "date": r["date"],
        "benchmark": "txt2img",
        "preset": r["preset"],
        "shape": f"1x{r['size']}x{r['size']}, {r['steps']} {r['sampler']} steps, CFG {r['guidance']}",
        "dtype": r["dtype"],
        "jaxdiff s/image": spread(r["jaxdiff"]["time_s"]),
        "torch s/image": spread(r["torch"]["time_s"]) if "torch" in r else "-",
        "ratio": f"{r['ratio']:.2f} (pairs {r['ratio_pairs_median']:.2f})" if "ratio" in r else "-",
        "compile s": f"{r['jaxdiff']['compile_s']:.1f}",
        "machine": r["env"]["machine"],
        "notes": r.get("note")
        or f"PSNR vs torch {r.get('check', {}).get('psnr_db', float('nan')):.1f} dB",
    }


def add_parser(sub):
    t = sub.add_parser(
        "txt2img", help="full txt2img vs diffusers' StableDiffusionPipeline (same weights)"
    )
    t.add_argument("--preset", default="sd15", choices=["sd15"])
    t.add_argument("--size", type=int, default=512, help="image height = width in pixels")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--sampler", default="euler")
    t.add_argument("--guidance", type=float, default=7.5)
    t.add_argument("--repeats", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-torch", action="store_true")
    t.add_argument(
        "--out", default=None, help="JSON file (default benchmarks/results/txt2img_<preset>.json)"
    )
    t.add_argument("--markdown", default="BENCHMARKS.md")
    t.add_argument("--xla-flags", default=None, help="as for `unet`")
    t.add_argument("--note", default="")
    return t

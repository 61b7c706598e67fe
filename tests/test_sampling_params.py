"""One SamplingParams for every sampler caller: its checks, its dict form (PNG metadata,
jaxdiff_sampling.json) through `jaxdiff txt2img --from-png`, and the training sample grid, which must
draw exactly what the Pipeline draws (shift_factor included)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import reference as ref
from flax import linen as nn
from PIL import Image

from jaxdiff.convert.diffusers import COMPONENTS
from jaxdiff.convert.pretrained import StableDiffusion
from jaxdiff.models import text as T
from jaxdiff.models import unet as U
from jaxdiff.models import vae as V
from jaxdiff.pipelines import generate
from jaxdiff.pipelines import stable_diffusion as PL
from jaxdiff.pipelines.params import (
    FIELDS,
    GenerationError,
    SamplingError,
    SamplingParams,
    parse_interval,
)
from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer
from jaxdiff.train import ldm
from jaxdiff.train.export import scheduler_config

# ------------------------------------------------------------------ checks and the dict form


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("steps", 0, "steps must be at least 1, got 0"),
        ("steps", 2.5, r"steps must be a number \(whole\)"),
        ("steps", True, r"steps must be a number \(whole\)"),
        ("steps", "20", r"steps must be a number \(whole\)"),
        ("num_images", 0, "num_images must be at least 1"),
        ("seed", 0.5, r"seed must be a number \(whole\)"),
        ("clip_skip", -1, "clip_skip must be at least 0"),
        ("height", 36, "height must be a positive multiple of 8"),
        ("width", 0, "width must be at least 1"),
        ("guidance", float("nan"), "guidance must be a finite number"),
        ("guidance", float("inf"), "guidance must be a finite number"),
        ("guidance_rescale", 1.5, r"guidance_rescale must be in \[0, 1\]"),
        ("guidance_rescale", float("nan"), r"guidance_rescale must be in \[0, 1\]"),
        ("eta", -0.1, "eta must be finite and >= 0"),
        ("eta", float("inf"), "eta must be finite and >= 0"),
        ("strength", 1.2, r"strength must be in \[0, 1\]"),
        ("guidance_interval", (0.6, 0.2), "0 <= lo <= hi <= 1"),
        ("guidance_interval", (0.0, 2.0), "0 <= lo <= hi <= 1"),
        ("guidance_interval", (0.5,), r"two numbers \(lo, hi\)"),
        ("guidance_interval", "0,0.5", "parse_interval"),
        ("guidance_interval", (0.0, float("nan")), "two numbers"),
        ("sampler", "k_lms", "unknown sampler 'k_lms'; choose one of ddim, ddpm, euler"),
    ],
)
def test_a_bad_value_is_refused_by_its_field(field, value, message):
    with pytest.raises(SamplingError, match=message) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and field in str(e.value)
    assert isinstance(e.value, GenerationError) and isinstance(e.value, ValueError)
    with pytest.raises(SamplingError, match=message):  # and on every way in
        SamplingParams().replace(**{field: value})


def test_values_are_normalised_so_equal_settings_are_equal():
    a = SamplingParams(
        steps=20.0, guidance=np.float32(3), guidance_interval=[0, 0.5], seed=np.int64(4)
    )
    b = SamplingParams(steps=20, guidance=3.0, guidance_interval=(0.0, 0.5), seed=4)
    assert a == b and hash(a) == hash(b) and type(a.steps) is int and type(a.guidance) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 3
    with pytest.raises(TypeError, match="unknown sampling setting.* step;"):
        a.replace(step=3)


def test_dict_round_trip_through_json():
    p = SamplingParams(
        steps=7,
        guidance=2.5,
        guidance_rescale=0.7,
        guidance_interval=(0.1, 0.6),
        sampler="euler_a",
        eta=0.3,
        clip_skip=1,
        seed=123,
        num_images=3,
        height=64,
        width=48,
        strength=0.4,
    )
    d = p.to_dict()
    assert tuple(d) == FIELDS and d["guidance_interval"] == [0.1, 0.6]
    assert SamplingParams.from_dict(json.loads(json.dumps(d))) == p
    assert SamplingParams.from_dict({}) == SamplingParams()
    assert SamplingParams.from_dict({"steps": 3}, base=p) == p.replace(steps=3)
    with pytest.raises(SamplingError, match="unknown: cfg, prompt") as e:
        SamplingParams.from_dict({"steps": 3, "prompt": "x", "cfg": 1})
    assert e.value.field is None
    with pytest.raises(SamplingError, match="expected an object"):
        SamplingParams.from_dict([1])
    with pytest.raises(SamplingError, match="guidance_rescale must be in"):
        SamplingParams.from_dict({"guidance_rescale": -1})


def test_parse_interval():
    assert parse_interval("0,0.5") == (0.0, 0.5) and parse_interval(" 0.2 , 1 ") == (0.2, 1.0)
    for text, message in (
        ("0.5", "must be LO,HI"),
        ("a,b", "must be LO,HI"),
        ("0,0.5,1", "must be LO,HI"),
        ("0.7,0.2", "0 <= lo <= hi <= 1"),
    ):
        with pytest.raises(SamplingError, match=message) as e:
            parse_interval(text)
        assert e.value.field == "guidance_interval"


# ------------------------------------------------------------------ PNG metadata round trip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("params") / "tiny-sd"
    ref.make_pipeline_folder(folder)
    return folder


def _meta(path):
    return json.loads(Image.open(path).text["jaxdiff"])


def _pixels(path):
    return np.asarray(Image.open(path), int)


def test_png_metadata_is_the_sampling_params_and_regenerates(model, tmp_path):
    """Every setting goes into the PNG as SamplingParams fields (this image's seed, one image, the sampler
    and size used); --from-png rebuilds the same SamplingParams and the same pixels; flags override it;
    a PNG written before num_images was recorded still regenerates."""
    want = SamplingParams(
        steps=3,
        guidance=5.0,
        guidance_rescale=0.5,
        guidance_interval=(0.0, 0.7),
        sampler="ddim",
        eta=0.5,
        clip_skip=1,
        seed=9,
        num_images=2,
        height=16,
        width=24,
    )
    flags = [
        "--model", str(model), "--prompt", "a red circle", "--negative-prompt", "blurry",
        "--steps", "3", "--guidance", "5", "--guidance-rescale", "0.5", "--guidance-interval",
        "0,0.7", "--sampler", "ddim", "--eta", "0.5", "--clip-skip", "1", "--seed", "9",
        "--num-images", "2", "--height", "16", "--width", "24", "--no-progress",
    ]  # fmt: skip
    paths = generate.run("txt2img", flags + ["--out", str(tmp_path / "a")])
    meta = _meta(paths[1])
    assert {k: meta[k] for k in generate.REQUEST_KEYS if k in meta} == {
        "mode": "txt2img",
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "model": str(model.resolve()),
    }
    assert "strength" not in meta  # txt2img: no strength to mislead
    saved = {k: v for k, v in meta.items() if k not in generate.REQUEST_KEYS}
    assert SamplingParams.from_dict(saved) == want.replace(seed=10, num_images=1, strength=0.8)
    assert Image.open(paths[1]).text["eta"] == "0.5"  # each setting as its own text chunk too

    again = generate.run(
        "txt2img", ["--from-png", str(paths[1]), "--out", str(tmp_path / "b"), "--no-progress"]
    )
    assert len(again) == 1 and _meta(again[0]) == meta
    assert np.abs(_pixels(again[0]) - _pixels(paths[1])).max() <= 1

    # flags override the PNG's settings, the rest are kept
    over = generate.run(
        "txt2img",
        ["--from-png", str(paths[1]), "--guidance", "2", "--out", str(tmp_path / "c")]
        + ["--no-progress"],
    )
    assert _meta(over[0]) == dict(meta, guidance=2.0)

    # a PNG as the CLI wrote it before SamplingParams: no num_images key
    legacy = {k: v for k, v in meta.items() if k != "num_images"}
    generate.save_png(tmp_path / "old.png", np.asarray(Image.open(paths[1])) / 255.0, legacy)
    old = generate.run(
        "txt2img", ["--from-png", str(tmp_path / "old.png"), "--out", str(tmp_path / "d")]
    )
    assert _meta(old[0]) == meta
    assert np.abs(_pixels(old[0]) - _pixels(paths[1])).max() <= 1

    # a PNG with a setting jaxdiff does not know is refused by name, before anything is compiled
    generate.save_png(tmp_path / "odd.png", np.zeros((16, 24, 3)), dict(meta, cfg_scale=3))
    n = PL.TRACES["generate"]
    with pytest.raises(SystemExit, match="odd.png: .*unknown: cfg_scale"):
        generate.run("txt2img", ["--from-png", str(tmp_path / "odd.png"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--num-images must be at least 1"):
        generate.run("txt2img", flags + ["--num-images", "0", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=r"--guidance-rescale must be in \[0, 1\]"):
        generate.run("txt2img", flags + ["--guidance-rescale", "2", "--out", str(tmp_path / "e")])
    assert PL.TRACES["generate"] == n and not (tmp_path / "e").exists()


def test_model_defaults_under_the_png_under_flags(model, tmp_path):
    """defaults <- the model's jaxdiff_sampling.json <- --from-png <- flags."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    (folder / generate.SAMPLING_FILE).write_text(json.dumps({"steps": 2, "guidance": 2.0}))
    base = ["--model", str(folder), "--prompt", "x", "--height", "16", "--width", "16"]
    first = generate.run(
        "txt2img", base + ["--guidance", "4", "--out", str(tmp_path / "a"), "--no-progress"]
    )[0]
    assert (_meta(first)["steps"], _meta(first)["guidance"]) == (2, 4.0)
    (folder / generate.SAMPLING_FILE).write_text(json.dumps({"steps": 3, "guidance": 1.5}))
    args = generate._parser("txt2img").parse_args(["--from-png", str(first), "--out", "o"])
    got = generate._resolve("txt2img", args)["params"]
    assert (got.steps, got.guidance) == (2, 4.0)  # the PNG's, not the model's newer file
    args = generate._parser("txt2img").parse_args(
        ["--from-png", str(first), "--steps", "5", "--out", "o"]
    )
    assert generate._resolve("txt2img", args)["params"].steps == 5


# ------------------------------------------------------------------ the training sample grid


SIZE = 16  # px; the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random tiny UNet / VAE / text encoder (jaxdiff presets), a CLIP tokenizer, a training config."""
    tcfg = dataclasses.replace(T.PRESETS["tiny"], vocab_size=49408)
    ucfg, vcfg = U.PRESETS["tiny"], V.PRESETS["tiny"]
    modules = {
        "unet": (U.UNet(ucfg), ucfg),
        "vae": (V.AutoencoderKL(vcfg), vcfg),
        "text_encoder": (T.TextTransformer(tcfg), tcfg),
    }
    params = {
        k: nn.unbox(m.init(jax.random.key(i), *COMPONENTS[k].dummy_inputs(c))["params"])
        for i, (k, (m, c)) in enumerate(modules.items())
    }
    tok = Tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    return ucfg, vcfg, tcfg, params, tok, ldm.LDMConfig()


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(steps=4, guidance=5.0, sampler="ddim"),
        SamplingParams(steps=3, guidance=3.0, sampler="dpm++2m", guidance_interval=(0.0, 0.6)),
    ],
    ids=["ddim", "dpm-interval"],
)
def test_training_sample_grid_is_the_pipelines_output(tiny, sp):
    """ldm_task's sample grid (jitted, as the loop runs it) against Pipeline.txt2img with the same
    SamplingParams, weights and noise, on a VAE whose latents are shifted as well as scaled."""
    ucfg, vcfg, tcfg, params, tok, cfg = tiny
    vcfg = dataclasses.replace(vcfg, scaling_factor=0.6, shift_factor=0.4)
    prompts = ["a red circle", "two blue squares", "a green star"]
    task = ldm.ldm_task(
        cfg,
        ucfg,
        vcfg,
        tcfg,
        {"vae": params["vae"], "text_encoder": params["text_encoder"]},
        tok("")[0],
        sample_ids=tok(prompts),
        sample_resolution=SIZE,
        sample_params=sp,
    )
    key = jax.random.key(5)
    grid = np.asarray(jax.jit(task.sample)(params["unet"], task.frozen, key))

    model = StableDiffusion(ucfg, vcfg, tcfg, params, tok, scheduler_config(cfg))
    pipe = PL.Pipeline.from_model(model)
    noise = np.asarray(jax.random.normal(key, (3, SIZE // 2, SIZE // 2, 4)))  # the grid's draw
    want = pipe.txt2img(prompts, params=sp, latents=ref.nchw(noise), height=SIZE, width=SIZE)
    assert grid.shape == want.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(grid, want, atol=2e-5)
    # the shift is not a no-op here: forgetting it (as the grid's own copy of the sampler did) shows
    unshifted = dataclasses.replace(model, vae_config=dataclasses.replace(vcfg, shift_factor=None))
    wrong = PL.Pipeline.from_model(unshifted).txt2img(
        prompts, params=sp, latents=ref.nchw(noise), height=SIZE, width=SIZE
    )
    assert np.abs(wrong - want).max() > 1e-2

"""txt2img / img2img end to end against diffusers' pipelines on a tiny random checkpoint (fp32):
same prompt, negative prompt, initial latents and noise -> the same final latents and images."""

import dataclasses

import diffusers
import jax
import numpy as np
import pytest
import reference as ref
import torch

from jaxdiff.pipelines import stable_diffusion as PL
from jaxdiff.pipelines.stable_diffusion import GenerationError, Pipeline

PROMPTS = ["a red circle in the top left", "two blue squares"]
NEGATIVE = ["", "a green star"]
SIZE = 32  # px; the tiny VAE downsamples by 2 -> 16x16 latents
LAT = (2, 4, 16, 16)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    ref.make_pipeline_folder(folder)
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))  # as users load it
    torch_pipe.set_progress_bar_config(disable=True)
    return folder, torch_pipe, Pipeline.from_pretrained(folder)


def _latents(seed=0, shape=LAT):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def psnr(a, b):
    return 10 * np.log10(1.0 / max(np.mean((np.asarray(a, np.float64) - b) ** 2), 1e-30))


def _variant(torch_pipe, pipe, sampler_cls, sampler, **sched):
    """Both pipelines with the same scheduler config (as if the checkpoint's JSON said so)."""
    raw = dict(pipe.model.scheduler_config, **sched)
    torch_pipe.scheduler = getattr(diffusers, sampler_cls).from_config(raw)
    return dataclasses.replace(pipe, model=dataclasses.replace(pipe.model, scheduler_config=raw))


VARIANTS = [
    ("DDIMScheduler", "ddim", {}),
    ("EulerDiscreteScheduler", "euler", {}),
    ("DPMSolverMultistepScheduler", "dpm++2m", {}),
    ("DPMSolverMultistepScheduler", "dpm++2m_karras", dict(use_karras_sigmas=True)),
    (
        "DDIMScheduler",
        "ddim",
        dict(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        ),
    ),
    (
        "EulerDiscreteScheduler",
        "euler",
        dict(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        ),
    ),
    (
        "DPMSolverMultistepScheduler",
        "dpm++2m",
        dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
]


@pytest.mark.parametrize(
    "cls,sampler,sched", VARIANTS, ids=[f"{v[1]}-{i}" for i, v in enumerate(VARIANTS)]
)
def test_txt2img_matches_diffusers(sd, cls, sampler, sched):
    _, torch_pipe, pipe = sd
    pipe = _variant(torch_pipe, pipe, cls, sampler, **sched)
    lat = _latents()
    kw = dict(
        negative_prompt=NEGATIVE,
        num_inference_steps=20,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
    )
    want_lat = torch_pipe(
        PROMPTS, latents=torch.tensor(lat), output_type="latent", **kw
    ).images.numpy()
    want_img = torch_pipe(PROMPTS, latents=torch.tensor(lat), output_type="np", **kw).images
    ours = dict(steps=20, guidance=7.5, sampler=sampler, latents=lat, height=SIZE, width=SIZE)
    got_lat = pipe.txt2img(PROMPTS, NEGATIVE, output="latent", **ours)
    got_img = pipe.txt2img(PROMPTS, NEGATIVE, **ours)
    assert got_lat.shape == want_lat.shape and got_img.shape == want_img.shape == (2, SIZE, SIZE, 3)
    rel = np.abs(got_lat - want_lat).max() / np.abs(want_lat).max()
    assert rel <= 1e-3, rel
    assert psnr(got_img, want_img) >= 60, psnr(got_img, want_img)


def _clip_skip_embeds(torch_pipe, prompts, skip):
    """SD's clip-skip by hand: diffusers' own path reaches for `text_model`, which transformers 5's
    CLIPTextModel no longer has."""
    te, tok = torch_pipe.text_encoder, torch_pipe.tokenizer
    ids = tok(
        prompts,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return te.final_layer_norm(hidden)


def test_guidance_rescale_and_clip_skip_match_diffusers(sd):
    _, torch_pipe, pipe = sd
    pipe = _variant(torch_pipe, pipe, "DDIMScheduler", "ddim")
    lat = _latents(1)
    want = torch_pipe(
        prompt_embeds=_clip_skip_embeds(torch_pipe, PROMPTS, 1),
        negative_prompt_embeds=_clip_skip_embeds(torch_pipe, NEGATIVE, 1),
        num_inference_steps=8,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        latents=torch.tensor(lat),
        height=SIZE,
        width=SIZE,
        output_type="latent",
    ).images.numpy()
    got = pipe.txt2img(
        PROMPTS,
        NEGATIVE,
        steps=8,
        guidance=5.0,
        guidance_rescale=0.7,
        clip_skip=1,
        latents=lat,
        height=SIZE,
        width=SIZE,
        output="latent",
    )
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    plain = pipe.txt2img(
        PROMPTS,
        NEGATIVE,
        steps=8,
        guidance=5.0,
        guidance_rescale=0.7,
        latents=lat,
        height=SIZE,
        width=SIZE,
        output="latent",
    )
    assert np.abs(plain - want).max() > 1e-2 * np.abs(want).max()  # clip-skip did change something


def test_guidance_one_and_zero(sd):
    """w = 1 is the conditional model alone (diffusers' guidance_scale=1); w = 0 is the unconditional
    one, i.e. the conditional model on the negative prompt."""
    _, torch_pipe, pipe = sd
    pipe = _variant(torch_pipe, pipe, "DDIMScheduler", "ddim")
    lat = _latents(2)
    kw = dict(
        num_inference_steps=6,
        guidance_scale=1.0,
        latents=torch.tensor(lat),
        height=SIZE,
        width=SIZE,
        output_type="latent",
    )
    cond = torch_pipe(PROMPTS, **kw).images.numpy()
    negs = torch_pipe(NEGATIVE, **kw).images.numpy()
    ours = dict(steps=6, latents=lat, height=SIZE, width=SIZE, output="latent")
    got1 = pipe.txt2img(PROMPTS, NEGATIVE, guidance=1.0, **ours)
    got0 = pipe.txt2img(PROMPTS, NEGATIVE, guidance=0.0, **ours)
    assert np.abs(got1 - cond).max() <= 1e-3 * np.abs(cond).max()
    assert np.abs(got0 - negs).max() <= 1e-3 * np.abs(negs).max()


def test_guidance_interval_matches_a_diffusers_loop(sd):
    """guidance_interval=(lo, hi): w on the steps with lo <= t / T <= hi, the conditional model alone on the
    others; against diffusers' UNet and DDIM scheduler stepped by hand; (0, 1) is plain guidance."""
    _, torch_pipe, pipe = sd
    pipe = _variant(torch_pipe, pipe, "DDIMScheduler", "ddim")
    lat, w, (lo, hi) = _latents(3), 5.0, (0.0, 0.5)
    unet, sched = torch_pipe.unet, torch_pipe.scheduler
    T = sched.config.num_train_timesteps
    with torch.no_grad():
        pos, neg = torch_pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
        sched.set_timesteps(8)
        x, guided = torch.tensor(lat) * sched.init_noise_sigma, []
        for t in sched.timesteps:
            if lo * T <= t <= hi * T:
                eps_u, eps_c = unet(torch.cat([x, x]), t, torch.cat([neg, pos])).sample.chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
            else:
                eps = unet(x, t, pos).sample
            guided.append(bool(lo * T <= t <= hi * T))
            x = sched.step(eps, t, x).prev_sample
    want = x.numpy()
    assert 0 < sum(guided) < len(guided)  # both kinds of step happened
    kw = dict(steps=8, guidance=w, latents=lat, height=SIZE, width=SIZE, output="latent")
    got = pipe.txt2img(PROMPTS, NEGATIVE, guidance_interval=(lo, hi), **kw)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    plain, cond = (
        pipe.txt2img(PROMPTS, NEGATIVE, **kw),
        pipe.txt2img(PROMPTS, NEGATIVE, **dict(kw, guidance=1.0)),
    )
    assert min(np.abs(got - plain).max(), np.abs(got - cond).max()) > 1e-2 * np.abs(want).max()
    np.testing.assert_allclose(
        pipe.txt2img(PROMPTS, NEGATIVE, guidance_interval=(0, 1), **kw), plain, atol=1e-6
    )
    n = PL.TRACES["generate"]
    pipe.txt2img(
        PROMPTS, NEGATIVE, guidance_interval=(0.2, 0.9), **kw
    )  # another interval: same program
    assert PL.TRACES["generate"] == n
    for bad, message in (
        ((0.6, 0.2), "0 <= lo <= hi <= 1"),
        ((0, 2), "0 <= lo <= hi <= 1"),
        ((0.5,), "two numbers"),
        ("ab", "two numbers"),
    ):
        with pytest.raises(GenerationError, match=message):
            pipe.txt2img("x", guidance_interval=bad, height=SIZE, width=SIZE)
    assert PL.TRACES["generate"] == n


def _photo(size=SIZE):
    from PIL import Image
    from skimage import data

    return (
        np.asarray(
            Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC), np.float32
        )
        / 255
    )


@pytest.mark.parametrize(
    "cls,sampler",
    [
        ("DDIMScheduler", "ddim"),
        ("EulerDiscreteScheduler", "euler"),
        ("DPMSolverMultistepScheduler", "dpm++2m"),
    ],
)
def test_img2img_matches_diffusers(sd, cls, sampler):
    folder, torch_pipe, pipe = sd
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**torch_pipe.components)
    i2i.set_progress_bar_config(disable=True)
    pipe = _variant(i2i, pipe, cls, sampler)
    image = np.stack([_photo(), _photo()[::-1]])
    gen = torch.Generator().manual_seed(0)
    want = i2i(
        PROMPTS,
        image=image,
        strength=0.6,
        negative_prompt=NEGATIVE,
        num_inference_steps=20,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    # diffusers draws the VAE posterior sample first, then the renoising noise, from its generator
    enc = torch.randn(LAT, generator=gen).numpy()
    noise = torch.randn(LAT, generator=gen).numpy()
    got = pipe.img2img(
        image,
        PROMPTS,
        NEGATIVE,
        strength=0.6,
        steps=20,
        guidance=7.5,
        sampler=sampler,
        noise=noise,
        encode_noise=enc,
    )
    assert psnr(got, want) >= 60, psnr(got, want)


def test_img2img_strength_zero_and_one(sd):
    _, _, pipe = sd
    image = _photo()
    untouched = pipe.img2img(image, "x", strength=0.0, steps=10, sampler="ddim")
    assert untouched.shape == (1, SIZE, SIZE, 3)
    full = pipe.img2img(image, "x", strength=1.0, steps=10, sampler="ddim", seed=3)
    part = pipe.img2img(image, "x", strength=0.5, steps=10, sampler="ddim", seed=3)
    assert not np.allclose(full, part)


def test_no_recompile_for_same_shapes(sd):
    _, _, pipe = sd
    kw = dict(steps=4, sampler="euler", height=SIZE, width=SIZE)
    pipe.txt2img("a red circle", seed=0, guidance=7.5, **kw)
    n = PL.TRACES["generate"]
    pipe.txt2img("a blue star on a gray background", "blurry", seed=5, guidance=3.0, **kw)
    assert PL.TRACES["generate"] == n  # new prompt, seed, guidance: same program
    pipe.txt2img(
        "a red circle", seed=0, guidance=7.5, steps=5, sampler="euler", height=SIZE, width=SIZE
    )
    assert PL.TRACES["generate"] == n + 1  # new step count: a new program


def test_seeds(sd):
    _, _, pipe = sd
    kw = dict(
        steps=4, sampler="euler_a", height=SIZE, width=SIZE
    )  # stochastic: step noise from the seed too
    a = pipe.txt2img("a red circle", num_images=3, seed=11, **kw)
    b = pipe.txt2img("a red circle", num_images=3, seed=11, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    c = pipe.txt2img(
        "a red circle", seed=12, **kw
    )  # image 1 of seed 11 is seed 12 alone (the same noise;
    np.testing.assert_allclose(
        c[0], a[1], atol=2e-5
    )  # XLA's batch-3 and batch-1 kernels round differently)


def test_sharded_batch_matches_one_device(sd):
    """5 prompts on an 8-device data mesh (padded to 8, trimmed) equal the single-device images."""
    from jaxdiff.sharding import make_mesh

    folder, _, pipe = sd
    assert jax.device_count() == 8
    prompts = [
        "a red circle",
        "a blue square",
        "two green stars",
        "a pink cross at the top",
        "a cyan diamond",
    ]
    kw = dict(steps=5, sampler="dpm++2m", height=SIZE, width=SIZE, seed=7)
    one = pipe.txt2img(prompts, **kw)
    for sharding in ("replicated", "fsdp"):
        sharded = Pipeline.from_model(
            pipe.model, mesh=make_mesh((8, 1, 1)), param_sharding=sharding
        )
        many = sharded.txt2img(prompts, **kw)
        assert many.shape == one.shape == (5, SIZE, SIZE, 3)
        np.testing.assert_allclose(many, one, atol=1e-5)


def test_progress_bar_counts_steps(sd, monkeypatch):
    _, _, pipe = sd
    ticks = []
    monkeypatch.setattr(PL, "_tick", lambda k: ticks.append(int(k)))
    PL._program.cache_clear()
    out = pipe.txt2img(
        "a red circle", steps=6, sampler="heun", height=SIZE, width=SIZE, progress=True
    )
    PL._program.cache_clear()
    quiet = pipe.txt2img("a red circle", steps=6, sampler="heun", height=SIZE, width=SIZE)
    assert sorted(ticks) == list(range(11))  # Heun: 2 * 6 - 1 model calls
    np.testing.assert_array_equal(out, quiet)


def test_bad_requests_fail_before_compiling(sd, tmp_path):
    _, _, pipe = sd
    n = PL.TRACES["generate"]
    with pytest.raises(GenerationError, match="height must be a positive multiple of 8"):
        pipe.txt2img("x", height=33, width=32)
    with pytest.raises(GenerationError, match=r"clip_skip must be in \[0, "):
        pipe.txt2img("x", clip_skip=99, height=SIZE, width=SIZE)
    with pytest.raises(TypeError, match="unknown sampling setting"):
        pipe.txt2img("x", step=3)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.txt2img("x", sampler="k_lms", height=SIZE, width=SIZE)
    with pytest.raises(GenerationError, match="strength"):
        pipe.img2img(_photo(), "x", strength=1.2)
    with pytest.raises(GenerationError, match=r"latents must have shape \(1, 4, 16, 16\)"):
        pipe.txt2img("x", latents=np.zeros((1, 4, 8, 8)), height=SIZE, width=SIZE)
    with pytest.raises(GenerationError, match="negative prompts"):
        pipe.txt2img(["a", "b"], ["c", "d", "e"], height=SIZE, width=SIZE)
    with pytest.raises(GenerationError, match=r"image values must be in \[0, 1\]"):
        pipe.img2img(_photo() * 255, "x")
    assert PL.TRACES["generate"] == n
    with pytest.raises(Exception, match="no such model folder"):
        Pipeline.from_pretrained(tmp_path / "missing")

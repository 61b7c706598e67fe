"""Every sampler against the matching diffusers scheduler: same model outputs (a fake denoiser
written in torch and in jax), same noise, the same latents after every model call (fp32)."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.diffusion import samplers as SM
from jaxdiff.diffusion import schedules as S

SD = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    skip_prk_steps=True,
)
V_ZSNR = dict(
    SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
)
CLS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m_karras": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def fake_torch(x, t):
    t = torch.as_tensor(t).float()
    out = 0.5 * torch.tanh(x) * torch.cos(t / 300.0) + 0.1 * x + 0.05 * torch.sin(t / 100.0)
    return out


def fake_jax(x, t):
    return 0.5 * jnp.tanh(x) * jnp.cos(t / 300.0) + 0.1 * x + 0.05 * jnp.sin(t / 100.0)


def _learned(fn, xp_cat, xp_tanh):
    return lambda x, t: xp_cat([fn(x, t), 0.8 * xp_tanh(x)])


def run_both(sampler, cfg, n=20, strength=None, eta=0.0, shape=(2, 4, 8, 6), learned=False):
    """diffusers' pipeline loop and jaxdiff's scan; returns (ours, theirs) trajectories [K, NCHW]."""
    cls = CLS[sampler]
    cfg = dict(cfg, use_karras_sigmas=True) if sampler == "dpm++2m_karras" else cfg
    sch = getattr(diffusers, cls).from_config(cfg)
    sch.set_timesteps(n)
    ts = sch.timesteps
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise0 = rng.standard_normal(shape).astype(np.float32)
    if strength is not None:
        start = SM.img2img_start(n, strength)
        ts = ts[start * sch.order :]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start * sch.order)
        x = sch.add_noise(torch.tensor(x0), torch.tensor(noise0), ts[:1])
    else:
        x = torch.tensor(noise0) * sch.init_noise_sigma
    x_start = x.numpy().copy()
    ft = _learned(fake_torch, lambda l: torch.cat(l, 1), torch.tanh) if learned else fake_torch
    gen, traj, noises, g2 = (
        torch.Generator().manual_seed(1),
        [],
        [],
        torch.Generator().manual_seed(1),
    )
    stochastic = sampler in ("euler_a", "ddpm") or eta > 0
    for t in ts:
        out = ft(sch.scale_model_input(x, t), t)
        kw = dict(generator=gen) if stochastic else {}
        if eta:
            kw["eta"] = eta
        x = sch.step(out, t, x, **kw).prev_sample
        traj.append(x.numpy().copy())
        draws = stochastic and not (sampler == "ddpm" and int(t) == 0)  # DDPM draws no noise at t=0
        noises.append(
            torch.randn(shape, generator=g2).numpy() if draws else np.zeros(shape, np.float32)
        )

    sched = S.resolve(dict(cfg, _class_name=cls), sampler)
    plan = SM.make_plan(sched, n, strength=strength, eta=eta)
    ref_ts = ts.numpy().astype(np.float32)
    if np.all(ref_ts == np.round(ref_ts)):
        np.testing.assert_array_equal(plan.timesteps, ref_ts)
    else:  # fractional (Karras) timesteps: float32 rounding of alpha_bar differs from torch's cumprod
        np.testing.assert_allclose(plan.timesteps, ref_ts, rtol=0, atol=1e-3)
    assert plan.stochastic == stochastic
    img = len(shape) == 4
    nhwc = lambda a: jnp.asarray(np.moveaxis(a, -3, -1) if img else a)  # noqa: E731
    x_init = nhwc(x_start)
    if strength is not None:
        mine = SM.add_noise(plan, nhwc(x0), nhwc(noise0))
        np.testing.assert_allclose(mine, x_init, atol=2e-6 * np.abs(x_start).max())
    fj = _learned(fake_jax, lambda l: jnp.concatenate(l, -1), jnp.tanh) if learned else fake_jax
    nz = nhwc(np.stack(noises)) if stochastic else None
    run = jax.jit(
        lambda x, a, z: SM.sample(fj, sched, a, x, stochastic=stochastic, noise=z, trajectory=True)
    )
    _, tr = run(x_init, plan.arrays, nz)
    tr = np.asarray(tr)
    return (np.moveaxis(tr, -1, -3) if img else tr), np.stack(traj)


def assert_trajectories_match(ours, ref, tol=1e-4):
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max(axis=tuple(range(1, ours.ndim)))
    scale = np.abs(ref).max(axis=tuple(range(1, ref.ndim)))
    assert np.all(np.isfinite(ours))
    assert (err <= tol * scale).all(), (
        f"worst step {err.argmax()}: {err.max():.3g} vs scale {scale[err.argmax()]:.3g}"
    )


CASES = [
    ("ddim", SD, {}),
    ("ddim", dict(SD, timestep_spacing="linspace", clip_sample=True), {}),
    ("ddim", V_ZSNR, {}),
    ("ddim", dict(SD, prediction_type="sample", thresholding=True, sample_max_value=2.0), {}),
    ("ddim", SD, dict(eta=0.6)),
    ("ddpm", SD, {}),
    ("ddpm", dict(SD, variance_type="fixed_large", prediction_type="v_prediction"), {}),
    (
        "ddpm",
        dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range"),
        dict(learned=True),
    ),
    ("euler", SD, {}),
    ("euler", dict(SD, use_karras_sigmas=True), {}),
    ("euler", V_ZSNR, {}),
    ("euler", dict(SD, timestep_spacing="leading", final_sigmas_type="sigma_min"), {}),
    ("euler_a", SD, {}),
    ("euler_a", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    ("heun", SD, {}),
    ("heun", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    ("dpm++2m", SD, {}),
    ("dpm++2m_karras", SD, {}),
    ("dpm++2m", V_ZSNR, {}),
    ("dpm++2m", dict(SD, solver_type="heun", timestep_spacing="leading", thresholding=True), {}),
    (
        "dpm++2m",
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", solver_order=1),
        {},
    ),
    ("pndm", SD, {}),
    ("pndm", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    ("unipc", SD, {}),
    ("unipc", V_ZSNR, {}),
    ("unipc", dict(SD, solver_order=1, thresholding=True), {}),
    ("unipc", dict(SD, prediction_type="sample", timestep_spacing="leading"), dict(n=12)),
]


@pytest.mark.parametrize("sampler,cfg,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sampler_matches_diffusers(sampler, cfg, kw):
    assert_trajectories_match(*run_both(sampler, cfg, **kw))


SCHEDULES = [
    SD,
    dict(SD, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    V_ZSNR,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD, num_train_timesteps=4000),
]


@pytest.mark.parametrize("cfg", SCHEDULES)
def test_schedule_tables_equal_diffusers_bit_for_bit(cfg):
    """betas and alpha_bar exactly as diffusers computes them (torch's float32 linspace; a cumprod
    accumulated in float64, rounded to float32)."""
    ref = diffusers.DDPMScheduler.from_config(cfg)
    s = S.resolve(cfg, "ddpm")
    if not cfg.get("rescale_betas_zero_snr"):
        np.testing.assert_array_equal(S.betas(s), ref.betas.numpy())
        np.testing.assert_array_equal(S.alphas_cumprod(s), ref.alphas_cumprod.numpy())
    else:  # the rescale takes square roots, where torch's float32 kernel is not correctly rounded
        np.testing.assert_allclose(S.alphas_cumprod(s), ref.alphas_cumprod.numpy(), rtol=5e-6)


def test_linspace32_is_torchs():
    rng = np.random.default_rng(0)
    ends = [
        (0.00085**0.5, 0.012**0.5),
        (1e-4, 0.02),
        *(sorted(rng.uniform(0, 1, 2)) for _ in range(4)),
    ]
    for n in (1, 2, 3, 999, 1000, 1001, 4000):
        for a, b in ends:
            want = torch.linspace(a, b, n, dtype=torch.float32).numpy()
            np.testing.assert_array_equal(S.linspace32(a, b, n), want)


# 1,000 steps of a 1,000-step schedule visit every timestep (steps_offset 0: SD's 1 would reach t = 1000)
SD_ALL = dict(SD, steps_offset=0)
LONG = [
    ("ddpm", SD_ALL, {}),
    ("ddpm", dict(SCHEDULES[1], steps_offset=0), {}),
    ("ddim", SD_ALL, dict(eta=0.5)),
    ("ddim", V_ZSNR, {}),
    ("euler", SD_ALL, {}),
]


@pytest.mark.parametrize("sampler,cfg,kw", LONG, ids=[f"{c[0]}-{i}" for i, c in enumerate(LONG)])
def test_1000_step_schedules_match_diffusers(sampler, cfg, kw):
    """Every training timestep sampled (float64 tables drifted to 2.4e-5 / 6.5e-5 in the DDPM cases)."""
    assert_trajectories_match(*run_both(sampler, cfg, n=1000, shape=(1, 4, 4, 4), **kw), tol=1.5e-5)


@pytest.mark.parametrize("eta", [None, 0.0, 0.7])
def test_step_tables_are_diffusers_float32_arithmetic(eta):
    """DDPM (eta None) and DDIM's per-step coefficients at 1,000 steps against diffusers' float32 scalars
    (its step's formulas, evaluated here in torch): where 1 - a_t / a_prev cancels (t = 1), float64
    tables differ by ~1e-4 relative."""
    cls = diffusers.DDPMScheduler if eta is None else diffusers.DDIMScheduler
    sch = cls.from_config(SD_ALL)
    sch.set_timesteps(1000)
    plan = SM.make_plan(S.resolve(SD_ALL, "ddpm" if eta is None else "ddim"), 1000, eta=eta or 0.0)
    ab, one = sch.alphas_cumprod, torch.tensor(1.0)
    want = {k: [] for k in ("x0_coef", "xt_coef", "std")} if eta is None else {"std": [], "dir": []}
    for t in sch.timesteps.tolist():
        if eta is None:
            prev = sch.previous_timestep(t)
            a_t, a_prev = ab[t], ab[prev] if prev >= 0 else one
            alpha, beta = a_t / a_prev, 1 - a_t / a_prev
            want["x0_coef"].append(a_prev**0.5 * beta / (1 - a_t))
            want["xt_coef"].append(alpha**0.5 * (1 - a_prev) / (1 - a_t))
            want["std"].append(sch._get_variance(t) ** 0.5 if t > 0 else torch.tensor(0.0))
        else:
            prev = t - 1
            a_prev = ab[prev] if prev >= 0 else sch.final_alpha_cumprod
            std = eta * sch._get_variance(t, prev) ** 0.5
            want["std"].append(std)
            want["dir"].append((1 - a_prev - std**2) ** 0.5)
    for k, v in want.items():
        np.testing.assert_allclose(
            np.asarray(plan.arrays[k]), torch.stack(v).numpy(), rtol=1e-6, err_msg=k
        )


def test_dpm_solvers_saved_variance_type_null_is_read(tmp_path):
    """DPMSolverMultistepScheduler saves `variance_type: null` (no learned variance): every sampler reads it."""
    diffusers.DPMSolverMultistepScheduler.from_config(SD).save_config(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["variance_type"] is None
    for sampler in S.SAMPLERS:
        assert S.resolve(cfg, sampler).variance_type == "fixed_small"


@pytest.mark.parametrize(
    "sampler", ["ddim", "euler", "euler_a", "heun", "dpm++2m", "pndm", "unipc"]
)
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_slice_matches_diffusers(sampler, strength):
    """SDEdit: noise to the strength's timestep, then the tail of the schedule (diffusers' get_timesteps)."""
    assert_trajectories_match(*run_both(sampler, SD, n=10, strength=strength, shape=(1, 4, 4, 4)))


def test_shape_agnostic():
    """The same sampler code denoises 1-D embeddings (unCLIP's prior) as well as images."""
    ours, ref = run_both("dpm++2m", SD, n=8, shape=(3, 16))
    assert_trajectories_match(ours, ref)


def test_plan_errors():
    with pytest.raises(S.ScheduleError, match="unknown sampler"):
        S.resolve(SD, "k_lms")
    with pytest.raises(S.ScheduleError, match="timestep_spacing"):
        S.resolve(dict(SD, timestep_spacing="karras"), "ddim")
    with pytest.raises(S.ScheduleError, match="Runge-Kutta"):
        S.resolve(dict(SD, skip_prk_steps=False), "pndm")
    with pytest.raises(ValueError, match="strength"):
        SM.make_plan(S.resolve(SD, "ddim"), 10, strength=1.5)
    with pytest.raises(S.ScheduleError, match="steps"):
        SM.make_plan(S.resolve(SD, "euler"), 0)


def test_swapped_sampler_takes_its_own_defaults():
    """An SD 1.5 config (PNDM, no timestep_spacing key) read as Euler gets Euler's linspace, like diffusers."""
    raw = {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "skip_prk_steps": True,
        "steps_offset": 1,
    }
    assert S.resolve(raw).sampler == "pndm"
    eu = S.resolve(raw, "euler")
    assert eu.timestep_spacing == "linspace" and eu.steps_offset == 1
    ref = diffusers.EulerDiscreteScheduler.from_config(raw)
    ref.set_timesteps(15)
    np.testing.assert_array_equal(SM.make_plan(eu, 15).timesteps, ref.timesteps.numpy())


def test_stochastic_sampler_keys():
    """Per-sample keys: same key same bits, different keys different samples."""
    sched = S.resolve(SD, "euler_a")
    plan = SM.make_plan(sched, 5)
    x = jnp.ones((2, 4, 4, 1))
    keys = jax.random.split(jax.random.key(0), 2)
    run = jax.jit(lambda x, k: SM.sample(fake_jax, sched, plan.arrays, x, stochastic=True, keys=k))
    a, b = run(x, keys), run(x, keys)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    c = run(x[:1], keys[1:])  # sample 1 alone equals sample 1 in the batch
    # Same noise bits; XLA may vectorise a batch of 1 and of 2 differently (last-bit float differences
    # were seen on CI's CPU), so equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(c[0], a[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(c[0], a[0], atol=1e-2)

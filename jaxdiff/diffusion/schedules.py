"""Noise schedules: a checkpoint's ``scheduler_config.json`` resolved for one sampler.

diffusers stores one scheduler's config with a checkpoint; swapping samplers keeps the stored keys
and takes the new sampler's defaults for the rest (``Scheduler.from_config``). ``resolve`` does the
same, so "euler on an SD 1.5 folder" means exactly what it means in diffusers. Everything here is
host-side numpy, computed once per (config, steps); the sampling loop only sees the arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# scheduler_config.json's `_class_name` -> our sampler name.
CLASS_TO_SAMPLER = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "PNDMScheduler": "pndm",
    "UniPCMultistepScheduler": "unipc",
}
SAMPLER_TO_CLASS = {v: k for k, v in CLASS_TO_SAMPLER.items()}
SAMPLER_TO_CLASS["dpm++2m_karras"] = "DPMSolverMultistepScheduler"

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    steps_offset=0,
    rescale_betas_zero_snr=False,
    timestep_spacing="leading",
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    use_karras_sigmas=False,
    final_sigmas_type="zero",
    variance_type="fixed_small",
    solver_order=2,
    solver_type="midpoint",
    algorithm_type="dpmsolver++",
    lower_order_final=True,
    euler_at_final=False,
    lambda_min_clipped=-math.inf,
    skip_prk_steps=False,
    interpolation_type="linear",
    timestep_type="discrete",
    sigma_min=None,
    sigma_max=None,
)

# Each diffusers scheduler class's own defaults (its __init__ signature), where they differ from _COMMON.
DEFAULTS = {
    "ddim": dict(clip_sample=True, set_alpha_to_one=True),
    "ddpm": dict(clip_sample=True),
    "euler": dict(timestep_spacing="linspace"),
    "euler_a": dict(timestep_spacing="linspace"),
    "heun": dict(beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace"),
    "dpm++2m": dict(timestep_spacing="linspace"),
    "dpm++2m_karras": dict(timestep_spacing="linspace"),
    "pndm": dict(),
    "unipc": dict(timestep_spacing="linspace"),
}
SAMPLERS = tuple(DEFAULTS)

# Keys each sampler reads; a stored value outside what we implement is refused, not ignored.
_SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "variance_type": ("fixed_small", "fixed_large", "learned_range"),
    "solver_type": ("midpoint", "heun", "bh1", "bh2", "logrho"),
    "algorithm_type": ("dpmsolver++",),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
}


class ScheduleError(ValueError):
    """A scheduler config or sampler choice we cannot honour; says which key and what would work."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A resolved scheduler config: the sampler and every option it reads."""

    sampler: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    trained_betas: tuple | None
    prediction_type: str
    steps_offset: int
    rescale_betas_zero_snr: bool
    timestep_spacing: str
    clip_sample: bool
    clip_sample_range: float
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    set_alpha_to_one: bool
    use_karras_sigmas: bool
    final_sigmas_type: str
    variance_type: str
    solver_order: int
    solver_type: str
    algorithm_type: str
    lower_order_final: bool
    euler_at_final: bool
    lambda_min_clipped: float
    skip_prk_steps: bool
    interpolation_type: str
    timestep_type: str
    sigma_min: float | None
    sigma_max: float | None


def resolve(config: dict | None, sampler: str | None = None, **overrides) -> Schedule:
    """A checkpoint's scheduler config (dict) for ``sampler`` (default: the config's own class)."""
    config = dict(config or {})
    for key in (
        config.pop("_use_default_values", None) or ()
    ):  # diffusers' in-memory marker: not chosen
        config.pop(key, None)
    if sampler is None:
        cls = config.get("_class_name", "DDIMScheduler")
        if cls not in CLASS_TO_SAMPLER:
            raise ScheduleError(
                f"scheduler class {cls!r} is not implemented; pick a sampler from {SAMPLERS}"
            )
        sampler = CLASS_TO_SAMPLER[cls]
    if sampler not in DEFAULTS:
        raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    values = dict(_COMMON, **DEFAULTS[sampler])
    values.update({k: v for k, v in config.items() if k in values})
    values.update(overrides)
    if sampler == "dpm++2m_karras":
        values["use_karras_sigmas"] = True
    if values["trained_betas"] is not None:
        values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
    if values["variance_type"] is None:  # DPM-Solver's saved default: no learned variance
        values["variance_type"] = "fixed_small"
    if values["lambda_min_clipped"] is None:
        values["lambda_min_clipped"] = -math.inf
    for key, allowed in _SUPPORTED.items():
        if values[key] not in allowed:
            raise ScheduleError(
                f"scheduler option {key}={values[key]!r} is not supported (supported: {allowed})"
            )
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if config.get(key) or overrides.get(key):
            raise ScheduleError(f"scheduler option {key}=True is not supported")
    if sampler == "pndm" and not values["skip_prk_steps"]:
        raise ScheduleError(
            "PNDM's Runge-Kutta warm-up is not implemented; jaxdiff's 'pndm' is PLMS "
            "(skip_prk_steps=True, as Stable Diffusion's configs set)"
        )
    if sampler in ("heun", "pndm") and values["rescale_betas_zero_snr"]:
        raise ScheduleError(
            f"sampler {sampler!r} cannot sample a zero-terminal-SNR schedule; "
            "use ddim, ddpm, euler, euler_a or dpm++2m"
        )
    if sampler == "euler_a" and values["prediction_type"] == "sample":
        raise ScheduleError(
            "euler_a supports prediction_type epsilon or v_prediction, not 'sample'"
        )
    if sampler == "pndm" and values["prediction_type"] == "sample":
        raise ScheduleError("pndm supports prediction_type epsilon or v_prediction, not 'sample'")
    # Solver types cross over as in diffusers: UniPC reads DPM's midpoint/heun as bh2, DPM reads bh1/bh2 as midpoint.
    if sampler == "unipc":
        values["solver_type"] = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}.get(
            values["solver_type"], values["solver_type"]
        )
        if (
            values["solver_type"] != "bh2"
            or not config.get("predict_x0", True)
            or config.get("disable_corrector")
        ):
            raise ScheduleError(
                "unipc implements solver_type='bh2' with predict_x0=True and no disabled corrector"
            )
    elif values["solver_type"] in ("bh1", "bh2", "logrho"):
        values["solver_type"] = "midpoint"
    if (sampler.startswith("dpm") or sampler == "unipc") and values["solver_order"] not in (1, 2):
        raise ScheduleError(
            f"{sampler} implements solver_order 1 or 2, not {values['solver_order']}"
        )
    fields = {f.name for f in dataclasses.fields(Schedule)}
    return Schedule(sampler=sampler, **{k: v for k, v in values.items() if k in fields})


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit: float32 ends and step, each
    value one fused multiply-add from the nearer end (numpy's float64 linspace differs by an ulp in about
    a quarter of the entries)."""
    lo, hi = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([lo], np.float32)
    step = np.float32((hi - lo) / np.float32(n - 1))
    i = np.arange(n)
    # an fma rounds once: the float64 product of a float32 and an index below 2**29 is exact
    up = (np.float64(lo) + np.float64(step) * i).astype(np.float32)
    down = (np.float64(hi) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, up, down)


def betas(s: Schedule) -> np.ndarray:
    """[T] float32 betas, as diffusers computes them (torch's float32 linspace, squared for scaled_linear)."""
    n = s.num_train_timesteps
    if s.trained_betas is not None:
        b = np.asarray(s.trained_betas, np.float32)
    elif s.beta_schedule == "linear":
        b = linspace32(s.beta_start, s.beta_end, n)
    elif s.beta_schedule == "scaled_linear":
        b = linspace32(s.beta_start**0.5, s.beta_end**0.5, n) ** 2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule)
        b = np.array(
            [
                min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999)
                for i in range(n)
            ],
            np.float32,
        )
    if s.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return b


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so that the last step has SNR exactly 0 (in
    float32, in diffusers' order of operations)."""
    ab_sqrt = np.sqrt(_cumprod32(1.0 - b.astype(np.float32)))
    first, last = ab_sqrt[0], ab_sqrt[-1]
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    # torch's float32 cumprod on CPU accumulates in float64 and rounds each prefix to float32; a float32
    # accumulation drifts ~1e-6 relative over 1,000 steps
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def alphas_cumprod(s: Schedule, *, sigma_safe: bool = False) -> np.ndarray:
    """[T] float32 alpha_bar_t. ``sigma_safe``: a zero terminal alpha_bar becomes 2**-24, as the
    sigma-space samplers need a finite sigma_max."""
    ab = _cumprod32(1.0 - betas(s))
    if sigma_safe and s.rescale_betas_zero_snr:
        ab = ab.copy()
        ab[-1] = 2.0**-24
    return ab


def spaced_timesteps(s: Schedule, n: int) -> np.ndarray:
    """The n discrete timesteps (descending) of the DDPM-family samplers."""
    T = s.num_train_timesteps
    if not 1 <= n <= T:
        raise ScheduleError(
            f"steps must be between 1 and the schedule's {T} training timesteps, got {n}"
        )
    if s.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if s.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + s.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose interpolated log-sigma equals log(sigma)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho

"""Samplers as pure step functions, run in one ``lax.scan`` over the model calls.

A :class:`Plan` is everything host-side: the model's timestep at each call and that call's step
coefficients (numpy, computed once per schedule/steps/strength, matching diffusers' schedulers
to float32 rounding). A step is ``(state, x, model_output, coefficients, noise) -> (x, state)``;
the scan carry holds latents and the sampler's history, never params. Shapes are free: the same
code denoises SD latents [B, h, w, 4], pixels, or 1-D embeddings [B, D].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import schedules as S
from jaxdiff.diffusion.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Plan:
    """The calls of one sampling run: ``arrays['t'][k]`` is the timestep fed to the model at call k."""

    schedule: Schedule
    arrays: dict  # name -> [K] float32 (and 't'): scanned over
    init_noise_sigma: float  # txt2img starts from noise * init_noise_sigma
    noise_a: float  # img2img starts from noise_a * x0 + noise_s * noise
    noise_s: float
    stochastic: bool  # draws fresh noise at some step
    num_steps: int  # denoising steps (a Heun step is two model calls)

    @property
    def num_calls(self) -> int:
        return int(self.arrays["t"].shape[0])

    @property
    def timesteps(self) -> np.ndarray:
        return self.arrays["t"]


def _f32(d: dict) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in d.items()}


def _vp_start(ab, t):
    return float(np.sqrt(ab[int(t)])), float(np.sqrt(1 - ab[int(t)]))


# ---------------------------------------------------------------- plans, one per sampler family


# The DDPM-family tables are computed in float32, in diffusers' order of operations: at t = 1 the
# cancellation in 1 - a_t / a_prev makes a float64 table differ from diffusers' step by ~1e-4 relative.


def _plan_ddim(s: Schedule, n: int, begin: int, eta: float):
    ab = S.alphas_cumprod(s)
    ts = S.spaced_timesteps(s, n)
    prev = ts - s.num_train_timesteps // n  # diffusers' DDIM uses this for every spacing
    final = np.float32(1.0) if s.set_alpha_to_one else ab[0]
    a_t, a_prev = ab[ts], np.where(prev >= 0, ab[np.maximum(prev, 0)], final)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * np.sqrt(var)
    c = dict(
        t=ts,
        c_in=np.ones(n),
        sqrt_a=np.sqrt(a_t),
        sqrt_1ma=np.sqrt(1 - a_t),
        sqrt_a_prev=np.sqrt(a_prev),
        dir=np.sqrt(np.maximum(1 - a_prev - std**2, 0.0)),
        std=std,
    )
    return c, 1.0, _vp_start(ab, ts[begin]), eta > 0


def _plan_ddpm(s: Schedule, n: int, begin: int, eta: float):
    ab = S.alphas_cumprod(s)
    ts = S.spaced_timesteps(s, n)
    prev = np.append(ts[1:], -1)
    a_t, a_prev = ab[ts], np.where(prev >= 0, ab[np.maximum(prev, 0)], np.float32(1.0))
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    var = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    std = np.sqrt(beta_t if s.variance_type == "fixed_large" else var)
    c = dict(
        t=ts,
        c_in=np.ones(n),
        sqrt_a=np.sqrt(a_t),
        sqrt_1ma=np.sqrt(1 - a_t),
        x0_coef=np.sqrt(a_prev) * beta_t / (1 - a_t),
        xt_coef=np.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),
        std=std * (ts > 0),
        min_log=np.log(var),
        max_log=np.log(beta_t),
        has_noise=(ts > 0) * 1.0,
    )
    return c, 1.0, _vp_start(ab, ts[begin]), True


def _karras_like_timesteps(s: Schedule, n: int) -> np.ndarray:
    """Euler/Heun's float timesteps (linspace is not rounded for them)."""
    T = s.num_train_timesteps
    if s.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if s.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + s.steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.float32) - 1


def _sigma_tables(s: Schedule, n: int, karras: bool, final_zero: bool):
    """Euler-family sigmas [n + 1] (last = final sigma) and float timesteps [n]."""
    if not 1 <= n <= s.num_train_timesteps:
        raise S.ScheduleError(f"steps must be between 1 and {s.num_train_timesteps}, got {n}")
    ab = S.alphas_cumprod(s, sigma_safe=True)
    full = ((1 - ab) / ab) ** 0.5  # float32, like diffusers
    ts = _karras_like_timesteps(s, n)
    sig = np.interp(ts, np.arange(len(full)), full)
    if karras:
        lo = s.sigma_min if s.sigma_min is not None else sig[-1]
        hi = s.sigma_max if s.sigma_max is not None else sig[0]
        sig = S.karras_sigmas(float(lo), float(hi), n)
        ts = np.array([S.sigma_to_t(x, np.log(full)) for x in sig])
    last = 0.0 if final_zero else float(((1 - ab[0]) / ab[0]) ** 0.5)
    return np.concatenate([sig, [last]]).astype(np.float32), ts.astype(np.float32)


def _init_sigma(s: Schedule, sigmas) -> float:
    m = float(np.max(sigmas))
    return m if s.timestep_spacing in ("linspace", "trailing") else float((m**2 + 1) ** 0.5)


def _plan_euler(s: Schedule, n: int, begin: int, eta: float, ancestral: bool = False):
    sig, ts = _sigma_tables(
        s, n, s.use_karras_sigmas and not ancestral, ancestral or s.final_sigmas_type == "zero"
    )
    sig64 = sig.astype(np.float64)
    c = dict(t=ts, sigma=sig64[:-1], sigma_next=sig64[1:], c_in=1 / np.sqrt(sig64[:-1] ** 2 + 1))
    if ancestral:
        fr, to = sig64[:-1], sig64[1:]
        up = np.sqrt(to**2 * (fr**2 - to**2) / fr**2)
        c.update(sigma_up=up, sigma_down=np.sqrt(to**2 - up**2))
    return c, _init_sigma(s, sig), (1.0, float(sig[begin])), ancestral


def _plan_heun(s: Schedule, n: int, begin: int, eta: float):
    sig, ts = _sigma_tables(s, n, s.use_karras_sigmas, True)
    # One entry per model call: sigma_i, then each later sigma twice (corrector, next predictor).
    il = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]]).astype(np.float64)
    t_il = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    K = len(t_il)
    first = np.arange(K) % 2 == 0
    nxt = np.append(il[1:], 0.0)
    sigma = np.where(first, il[:K], il[np.maximum(np.arange(K) - 1, 0)])  # predictor's sigma
    sigma_next = np.where(first, nxt[:K], il[:K])
    dt = sigma_next - sigma
    c = dict(
        t=t_il,
        c_in=1 / np.sqrt(il[:K] ** 2 + 1),
        first=first * 1.0,
        sigma_in=np.where(first, sigma, sigma_next),
        dt=dt,
    )
    return c, _init_sigma(s, sig), (1.0, float(il[begin])), False


def _dpm_timesteps(s: Schedule, n: int) -> np.ndarray:
    T = s.num_train_timesteps
    ab = S.alphas_cumprod(s).astype(np.float32)
    with np.errstate(divide="ignore"):
        lam = np.log(np.sqrt(ab)) - np.log(np.sqrt(1 - ab))
    last = T - int(np.searchsorted(lam[::-1], s.lambda_min_clipped))
    if s.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if s.timestep_spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(
            np.int64
        ) + s.steps_offset
    return np.arange(last, 0, -T / n).round().astype(np.int64) - 1


def _plan_dpm(s: Schedule, n: int, begin: int, eta: float):
    if not 1 <= n <= s.num_train_timesteps:
        raise S.ScheduleError(f"steps must be between 1 and {s.num_train_timesteps}, got {n}")
    ab = S.alphas_cumprod(s, sigma_safe=True)
    full = ((1 - ab) / ab) ** 0.5
    ts = _dpm_timesteps(s, n)
    if s.use_karras_sigmas:
        sig = S.karras_sigmas(float(full[0]), float(full[-1]), n)
        ts = np.array([S.sigma_to_t(x, np.log(full)) for x in sig])
        if s.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sig = np.interp(ts, np.arange(len(full)), full)
    last = 0.0 if s.final_sigmas_type == "zero" else float(((1 - ab[0]) / ab[0]) ** 0.5)
    sig = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigt = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigt)
        i = np.arange(n)
        h = lam[i + 1] - lam[i]
        em1 = np.exp(-h) - 1.0
        A = sigt[i + 1] / sigt[i]
        B = -alpha[i + 1] * em1
        r0 = (lam[i] - lam[np.maximum(i - 1, 0)]) / h
        if s.solver_type == "midpoint":
            C = -0.5 * alpha[i + 1] * em1 / r0
        else:
            C = alpha[i + 1] * (em1 / h + 1.0) / r0
    lower_final = (
        s.euler_at_final or (s.lower_order_final and n < 15) or s.final_sigmas_type == "zero"
    )
    first_order = (i == begin) | (s.solver_order == 1) | ((i == n - 1) & lower_final)
    C = np.where(first_order, 0.0, C)
    c = dict(
        t=ts.astype(np.float64),
        c_in=np.ones(n),
        alpha_s=alpha[:-1],
        sigma_s=sigt[:-1],
        A=A,
        B=B,
        C=C,
    )
    return c, 1.0, (float(alpha[begin]), float(sigt[begin])), False


def _plan_pndm(s: Schedule, n: int, begin: int, eta: float):
    T = s.num_train_timesteps
    if not 1 <= n <= T:
        raise S.ScheduleError(f"steps must be between 1 and {T}, got {n}")
    if s.timestep_spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif s.timestep_spacing == "leading":
        base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + s.steps_offset
    else:
        base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    calls = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1][begin:]
    ab = S.alphas_cumprod(s).astype(np.float64)
    final = 1.0 if s.set_alpha_to_one else ab[0]
    ratio = T // n
    rows, n_ets = [], 0
    adams = {
        1: [1.0],
        2: [1.5, -0.5],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    for counter, t in enumerate(calls):  # replays PNDMScheduler.step_plms' bookkeeping
        t_from, t_to = int(t), int(t) - ratio
        push = counter != 1
        if not push:
            t_from, t_to = int(t) + ratio, int(t)
        n_ets = min(n_ets + 1, 4) if push else n_ets
        w = [0.0] * 4
        if counter == 1:
            w[0], w_raw = 0.5, 0.5
        else:
            w[:n_ets], w_raw = adams[n_ets], 0.0
        a_t, a_prev = ab[t_from], (ab[t_to] if t_to >= 0 else final)
        denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
        rows.append(
            dict(
                t=t,
                c_in=1.0,
                push=float(push),
                w_raw=w_raw,
                w0=w[0],
                w1=w[1],
                w2=w[2],
                w3=w[3],
                save_cur=float(counter == 0),
                use_cur=float(counter == 1),
                A=np.sqrt(a_prev / a_t),
                B=-(a_prev - a_t) / denom,
                va=np.sqrt(a_t),
                vb=np.sqrt(1 - a_t),
            )
        )
    c = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return c, 1.0, _vp_start(ab, calls[0]), False


def _unipc_coefs(lam, alpha, sigt, s0, t, prev, order):
    """UniPC-bh2 (Zhao et al. 2023) in data prediction, from s0 to t, with the previous point `prev`
    for order 2: x_t = A x + M m0 + D (m_prev - m0) [+ E (m_t - m0), the corrector's own term]."""
    h = lam[t] - lam[s0]
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = np.expm1(hh)
    A, M = sigt[t] / sigt[s0], -alpha[t] * h_phi_1
    rk = (lam[prev] - lam[s0]) / h if order == 2 else 1.0
    b, hpk, fact = [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(hpk * fact / B_h)
        fact *= i + 1
        hpk = hpk / hh - 1 / fact
    return A, M, B_h, rk, np.array(b)


def _plan_unipc(s: Schedule, n: int, begin: int, eta: float):
    c, init, start, stochastic = _plan_dpm(s, n, begin, eta)
    sig = np.append(c["sigma_s"] / c["alpha_s"], 0.0 if s.final_sigmas_type == "zero" else np.nan)
    if s.final_sigmas_type != "zero":
        ab = S.alphas_cumprod(s, sigma_safe=True)
        sig[-1] = float(np.float32(((1 - ab[0]) / ab[0]) ** 0.5))
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigt = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigt)
        rows, prev_order = [], 0
        for i in range(n):
            r = dict(pA=0.0, pM=0.0, pD=0.0, cA=0.0, cM=0.0, cD=0.0, cE=0.0, use_c=0.0)
            if i > begin:  # corrector for the previous step
                A, M, B_h, rk, b = _unipc_coefs(lam, alpha, sigt, i - 1, i, i - 2, prev_order)
                if prev_order == 1:
                    rhos = np.array([0.5])
                else:
                    rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
                r.update(
                    use_c=1.0,
                    cA=A,
                    cM=M,
                    cE=-alpha[i] * B_h * rhos[-1],
                    cD=(-alpha[i] * B_h * rhos[0] / rk) if prev_order == 2 else 0.0,
                )
            order = min(s.solver_order, n - i) if s.lower_order_final else s.solver_order
            order = min(order, i - begin + 1)
            A, M, B_h, rk, _ = _unipc_coefs(lam, alpha, sigt, i, i + 1, i - 1, order)
            r.update(pA=A, pM=M, pD=(-alpha[i + 1] * B_h * 0.5 / rk) if order == 2 else 0.0)
            rows.append(r)
            prev_order = order
    c = dict(
        t=c["t"],
        c_in=c["c_in"],
        alpha_s=c["alpha_s"],
        sigma_s=c["sigma_s"],
        **{k: np.array([r[k] for r in rows]) for k in rows[0]},
    )
    return c, init, start, stochastic


_PLANS = {
    "ddim": _plan_ddim,
    "ddpm": _plan_ddpm,
    "euler": _plan_euler,
    "euler_a": lambda s, n, b, e: _plan_euler(s, n, b, e, ancestral=True),
    "heun": _plan_heun,
    "dpm++2m": _plan_dpm,
    "dpm++2m_karras": _plan_dpm,
    "pndm": _plan_pndm,
    "unipc": _plan_unipc,
}
_ORDER = {"heun": 2}


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first denoising step for SDEdit at ``strength`` (diffusers' get_timesteps)."""
    init = min(int(num_steps * strength), num_steps)
    return max(num_steps - init, 0)


def make_plan(
    schedule: Schedule, num_steps: int, *, strength: float | None = None, eta: float = 0.0
) -> Plan:
    """The host-side tables for ``num_steps`` denoising steps; ``strength`` < 1 starts part-way (img2img)."""
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    order = _ORDER.get(schedule.sampler, 1)
    start = 0 if strength is None else img2img_start(num_steps, strength)
    begin = start * order
    slice_from = 0 if schedule.sampler == "pndm" else begin  # PLMS slices (and restarts) itself
    if start >= num_steps:  # strength 0: nothing to denoise
        c, init_sigma, _, stochastic = _PLANS[schedule.sampler](schedule, num_steps, 0, eta)
        arrays = {k: np.asarray(v)[:0] for k, v in c.items()}
        return Plan(schedule, _f32(arrays), init_sigma, 1.0, 0.0, False, 0)
    c, init_sigma, (na, ns), stochastic = _PLANS[schedule.sampler](schedule, num_steps, begin, eta)
    arrays = _f32({k: np.asarray(v)[slice_from:] for k, v in c.items()})
    return Plan(schedule, arrays, float(init_sigma), na, ns, bool(stochastic), num_steps - start)


# ---------------------------------------------------------------- steps


def _threshold(x0, s: Schedule):
    """Imagen's dynamic thresholding (per sample), or plain clipping when so configured."""
    if s.thresholding:
        flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
        q = jnp.clip(
            jnp.quantile(flat, s.dynamic_thresholding_ratio, axis=1), 1.0, s.sample_max_value
        )
        q = q.reshape((-1,) + (1,) * (x0.ndim - 1))
        return (jnp.clip(x0, -q, q) / q).astype(x0.dtype)
    if s.clip_sample:
        return jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range)
    return x0


def _vp_x0_eps(s: Schedule, x, out, sqrt_a, sqrt_1ma):
    """x_t = sqrt_a * x0 + sqrt_1ma * eps: the model's prediction as (x0, eps)."""
    if s.prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a, out
    if s.prediction_type == "sample":
        return out, (x - sqrt_a * out) / sqrt_1ma
    return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x  # v-prediction


def _sigma_x0(s: Schedule, x, out, sigma):
    """Variance-exploding view x = x0 + sigma * eps (Euler, Heun)."""
    if s.prediction_type == "epsilon":
        return x - sigma * out
    if s.prediction_type == "sample":
        return out
    return out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)


def _step_ddim(s, state, x, out, c, noise):
    x0, eps = _vp_x0_eps(s, x, out, c["sqrt_a"], c["sqrt_1ma"])
    x0 = _threshold(x0, s)
    x = c["sqrt_a_prev"] * x0 + c["dir"] * eps
    return (x + c["std"] * noise if noise is not None else x), state


def _step_ddpm(s, state, x, out, c, noise):
    if s.variance_type == "learned_range":
        out, v = jnp.split(out, 2, axis=-1)
    x0, _ = _vp_x0_eps(s, x, out, c["sqrt_a"], c["sqrt_1ma"])
    x0 = _threshold(x0, s)
    mean = c["x0_coef"] * x0 + c["xt_coef"] * x
    if s.variance_type == "learned_range":
        frac = (v + 1) / 2
        std = jnp.exp(0.5 * (frac * c["max_log"] + (1 - frac) * c["min_log"])) * c["has_noise"]
    else:
        std = c["std"]
    return mean + std * noise, state


def _step_euler(s, state, x, out, c, noise):
    x0 = _sigma_x0(s, x, out, c["sigma"])
    d = (x - x0) / c["sigma"]
    return x + d * (c["sigma_next"] - c["sigma"]), state


def _step_euler_a(s, state, x, out, c, noise):
    x0 = _sigma_x0(s, x, out, c["sigma"])
    d = (x - x0) / c["sigma"]
    return x + d * (c["sigma_down"] - c["sigma"]) + noise * c["sigma_up"], state


def _step_heun(s, state, x, out, c, noise):
    sig = c["sigma_in"]
    x0 = _threshold(_sigma_x0(s, x, out, sig), s)
    d = (x - x0) / sig
    first = c["first"] > 0
    predictor = x + d * c["dt"]
    corrector = state["x"] + 0.5 * (state["d"] + d) * c["dt"]
    new = dict(x=jnp.where(first, x, state["x"]), d=jnp.where(first, d, state["d"]))
    return jnp.where(first, predictor, corrector), new


def _data_prediction(s, x, out, c):
    """The multistep solvers' x0 estimate at x = alpha_s x0 + sigma_s eps (thresholded if configured)."""
    if s.prediction_type == "epsilon":
        m = (x - c["sigma_s"] * out) / c["alpha_s"]
    elif s.prediction_type == "sample":
        m = out
    else:
        m = c["alpha_s"] * x - c["sigma_s"] * out
    return _threshold(m, dataclasses.replace(s, clip_sample=False))


def _step_dpm(s, state, x, out, c, noise):
    # DPM-Solver++(2M) (Lu et al. 2022) in data prediction: m = x0 estimate; A, B, C from the log-SNR steps.
    m = _data_prediction(s, x, out, c)
    x = c["A"] * x + c["B"] * m + c["C"] * (m - state["m"])
    return x, dict(m=m)


def _step_pndm(s, state, x, out, c, noise):
    # PLMS (Liu et al. 2022): Adams-Bashforth over the last four eps, ets[3] newest.
    push = c["push"] > 0
    ets = jnp.where(push, jnp.concatenate([state["ets"][1:], out[None]], 0), state["ets"])
    eff = (
        c["w_raw"] * out + c["w0"] * ets[3] + c["w1"] * ets[2] + c["w2"] * ets[1] + c["w3"] * ets[0]
    )
    src = jnp.where(c["use_cur"] > 0, state["cur"], x)
    if s.prediction_type == "v_prediction":
        eff = c["va"] * eff + c["vb"] * src
    new = dict(ets=ets, cur=jnp.where(c["save_cur"] > 0, x, state["cur"]))
    return c["A"] * src + c["B"] * eff, new


def _step_unipc(s, state, x, out, c, noise):
    # UniPC: correct the previous step with this model output (UniC), then predict the next (UniP).
    m = _data_prediction(s, x, out, c)
    m0, m1 = state["m0"], state["m1"]
    corrected = c["cA"] * state["last"] + c["cM"] * m0 + c["cD"] * (m1 - m0) + c["cE"] * (m - m0)
    x = jnp.where(c["use_c"] > 0, corrected, x)
    x_next = c["pA"] * x + c["pM"] * m + c["pD"] * (m0 - m)
    return x_next, dict(last=x, m0=m, m1=m0)


STEPS: dict[str, Callable] = {
    "ddim": _step_ddim,
    "ddpm": _step_ddpm,
    "euler": _step_euler,
    "euler_a": _step_euler_a,
    "heun": _step_heun,
    "dpm++2m": _step_dpm,
    "dpm++2m_karras": _step_dpm,
    "pndm": _step_pndm,
    "unipc": _step_unipc,
}


def init_state(s: Schedule, x) -> dict:
    z = jnp.zeros_like(x)
    return {
        "heun": lambda: dict(x=z, d=z),
        "dpm++2m": lambda: dict(m=z),
        "dpm++2m_karras": lambda: dict(m=z),
        "pndm": lambda: dict(ets=jnp.zeros((4,) + x.shape, x.dtype), cur=z),
        "unipc": lambda: dict(last=z, m0=z, m1=z),
    }.get(s.sampler, dict)()


def add_noise(plan: Plan, x0, noise):
    """SDEdit's start: x0 noised to the plan's first timestep."""
    return plan.noise_a * x0 + plan.noise_s * noise


def step_noise(keys, k, shape, dtype=jnp.float32):
    """Fresh noise for call k: one key per sample, so a sample's noise never depends on its batch."""
    return jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, k), shape[1:], dtype))(keys)


def sample(
    denoise: Callable,
    schedule: Schedule,
    arrays: dict,
    x,
    *,
    stochastic: bool = False,
    keys=None,
    noise=None,
    trajectory: bool = False,
    callback: Callable | None = None,
):
    """Run every call of a plan in one ``lax.scan``. Traceable; call inside jit.

    denoise(x_in, t) -> model output, with x_in = x * c_in and t the call's timestep.
    stochastic samplers need per-sample ``keys`` [B] or explicit ``noise`` [K, *x.shape].
    Returns the final x, and the x after every call [K, *x.shape] when ``trajectory``.
    """
    step = STEPS[schedule.sampler]
    K = arrays["t"].shape[0]
    if stochastic and keys is None and noise is None:
        raise ValueError("a stochastic sampler needs keys or explicit noise")

    def body(carry, xs):
        x, state = carry
        k, c, z = xs
        out = denoise((x * c["c_in"]).astype(x.dtype), c["t"])
        if stochastic and z is None:
            z = step_noise(keys, k, x.shape, x.dtype)
        x, state = step(schedule, state, x, out.astype(x.dtype), c, z if stochastic else None)
        if callback is not None:
            jax.debug.callback(callback, k)
        return (x, state), (x if trajectory else None)

    xs = (jnp.arange(K), arrays, noise if stochastic else None)
    (x, _), traj = jax.lax.scan(body, (x, init_state(schedule, x)), xs, length=K)
    return (x, traj) if trajectory else x

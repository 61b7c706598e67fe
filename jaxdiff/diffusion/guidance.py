"""Guidance wraps a denoiser: classifier-free (one batched call) and classifier (a gradient).

A denoiser here is ``model(x, t, cond) -> output`` with ``cond`` any pytree whose leaves have the
batch as their first axis (text tokens, pooled text, an image embedding, a low-resolution image).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def pair(uncond, cond):
    """Interleave two batches [B, ...] into [2B, ...] as (u0, c0, u1, c1, ...): each data-parallel
    shard then holds both halves of its own samples, so guidance needs no cross-device traffic."""
    return jax.tree.map(
        lambda u, c: jnp.stack([u, c], axis=1).reshape((-1,) + u.shape[1:]), uncond, cond
    )


def unpair(x):
    """Inverse of :func:`pair`: [2B, ...] -> (uncond [B, ...], cond [B, ...])."""
    x = x.reshape((-1, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


def combine(out_u, out_c, scale, rescale=0.0):
    """eps = eps_u + w (eps_c - eps_u); ``rescale`` > 0 applies Lin et al. 2023 (sec. 3.4): match the
    guided output's std to the conditional one's, mixed in with weight ``rescale``."""
    guided = out_u + scale * (out_c - out_u)
    if isinstance(rescale, (int, float)) and rescale == 0:
        return guided
    axes = tuple(range(1, guided.ndim))
    std_c = jnp.std(out_c, axis=axes, keepdims=True)
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    return rescale * guided * (std_c / std_g) + (1 - rescale) * guided


def mode_for(scale: float) -> str:
    """Which passes a guidance scale needs: w = 1 is the conditional model alone, w = 0 the
    unconditional one (note: diffusers runs no guidance at all for any w <= 1)."""
    return "cond" if scale == 1 else "uncond" if scale == 0 else "cfg"


def classifier_free(
    model: Callable, cond, uncond, scale, *, rescale=0.0, mode: str = "cfg", interval=None
) -> Callable:
    """A denoiser ``(x, t) -> output`` guided by one model call per step on the paired batch.

    ``interval`` = (t_lo, t_hi), in the model's timesteps: guide only the calls with t_lo <= t <= t_hi and
    run the conditional model alone (w = 1, half the batch) on the others (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval"). The branch is a ``lax.cond`` on the step's scalar t.
    """
    if mode == "cond":
        return lambda x, t: model(x, t, cond)
    if mode == "uncond":
        return lambda x, t: model(x, t, uncond)
    both = pair(uncond, cond)

    def guided(x, t):
        out_u, out_c = unpair(model(pair(x, x), t, both))
        return combine(out_u, out_c, scale, rescale)

    if interval is None:
        return guided
    lo, hi = interval

    def denoise(x, t):
        inside = jnp.logical_and(t >= lo, t <= hi)
        if jnp.ndim(inside):
            raise ValueError(
                f"a guidance interval needs one timestep per call, got t of shape {jnp.shape(t)}"
            )
        dtype = jax.eval_shape(guided, x, t).dtype  # both branches must return one type
        return jax.lax.cond(inside, guided, lambda x, t: model(x, t, cond).astype(dtype), x, t)

    return denoise


def classifier(denoise: Callable, log_prob: Callable, scale, sigma_of_t: Callable) -> Callable:
    """Classifier guidance (Dhariwal & Nichol 2021) for an epsilon denoiser:
    eps' = eps - sqrt(1 - alpha_bar_t) * s * grad_x log p(y | x_t, t).

    ``log_prob(x, t)`` returns per-sample log-probabilities [B] of the target labels under a
    noise-aware classifier; ``sigma_of_t(t)`` gives sqrt(1 - alpha_bar_t).
    """

    def guided(x, t):
        grad = jax.grad(lambda z: jnp.sum(log_prob(z, t)))(x)
        return denoise(x, t) - sigma_of_t(t) * scale * grad

    return guided

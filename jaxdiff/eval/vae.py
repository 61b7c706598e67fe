"""Reconstruction quality of a KL-VAE: PSNR of decode(encode(x)) on shapes-world images.

jaxdiff eval vae --model runs/vae_shapes|models/shapes_sd [--split validation] [--n 500]
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from jaxdiff.data import shapes_world as sw
from jaxdiff.eval import fidelity
from jaxdiff.models.vae import AutoencoderKL


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def reconstruct(config, params, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """uint8 [N, S, S, 3] -> decode(mode of q(z | x)), uint8."""

    vae = AutoencoderKL(config)

    @jax.jit
    def run(x):
        post = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        return vae.apply({"params": params}, post.mean, method=AutoencoderKL.decode)

    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].astype(np.float32) / 127.5 - 1
        y = np.asarray(run(x))
        out.append(np.clip(np.round((y + 1) * 127.5), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def shapes_world_psnr(
    config, params, split: str = "validation", n: int = 500, resolution: int = 64
) -> dict:
    """PSNR of reconstructions of rendered examples 0 .. n-1, and their prompt fidelity against the
    examples' own captions: the ceiling on any latent diffusion model's fidelity with this VAE."""

    scenes = [sw.sample_scene(split, i) for i in range(n)]
    images = np.stack([sw.render(s, resolution) for s in scenes])
    recon = reconstruct(config, params, images)
    p = psnr(images, recon)
    with warnings.catch_warnings():  # below 64 px the scorer warns (fast tests only)
        warnings.simplefilter("ignore")
        rep = fidelity.evaluate(recon, [s.caption for s in scenes])
    return {
        "split": split,
        "n": n,
        "resolution": resolution,
        "psnr_mean": float(p.mean()),
        "psnr_median": float(np.median(p)),
        "psnr_min": float(p.min()),
        "fidelity": rep["overall"]["accuracy"],
        "fidelity_by_attribute": {k: v["accuracy"] for k, v in rep["by_attribute"].items()},
    }

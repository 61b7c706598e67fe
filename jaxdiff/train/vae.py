"""The KL-VAE task: reconstruction + KL, and an optional patch discriminator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.train.step import Task, compute_dtype, init_like


@dataclasses.dataclass(frozen=True)
class VAEConfigTrain:
    reconstruction: str = "l1"  # l1 | l2
    kl_weight: float = 1e-6
    compute_dtype: str = "float32"
    disc_start: int = -1  # >= 0: a patch discriminator joins at this step (-1: none)
    disc_weight: float = 0.5  # weight of the generator's adversarial term
    disc_channels: int = 64
    disc_layers: int = 3
    logvar_init: float = 0.0  # != 0: the posterior's initial log-variance (quant_conv's bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided 4x4 convs -> one real/fake logit per image patch."""

    channels: int = 64
    layers: int = 3

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, h, w, 1]
        for i in range(self.layers):
            x = nn.Conv(self.channels * 2**i, (4, 4), strides=2, padding=1, name=f"conv_{i}")(x)
            if i:
                x = nn.GroupNorm(num_groups=min(32, self.channels * 2**i // 4), name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return nn.Conv(1, (4, 4), padding=1, name="logits")(x)


def vae_task(cfg: VAEConfigTrain, vae_config, init_params=None) -> Task:
    """The KL-VAE: reconstruction (L1 or L2, per pixel) + kl_weight * KL(q(z|x) || N(0, I)) per pixel,
    and with ``disc_start`` >= 0 a hinge-loss patch discriminator from that step on (Esser et al. 2021).

    With the discriminator, params are {"vae": ..., "disc": ...} and one optimiser step updates both:
    the VAE's loss sees the discriminator through stop_gradient and vice versa, so each part only
    gets the gradient of its own objective."""
    if cfg.reconstruction not in ("l1", "l2"):
        raise ValueError(f"reconstruction must be l1 or l2, got {cfg.reconstruction!r}")
    vae = AutoencoderKL(vae_config, dtype=compute_dtype(cfg.compute_dtype))
    disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if cfg.disc_start >= 0 else None

    def init(key):
        params = init_like(vae, "vae", vae_config, key, init_params)
        if init_params is None and cfg.logvar_init and vae_config.use_quant_conv:
            # start with a narrow posterior: with log-variance ~0 the sampled latents are mostly noise and
            # Adam needs ~|logvar| / lr steps to shrink it (measured: 19.5 dB vs 26.7 dB after 300 steps)
            bias = params["quant_conv"]["bias"]
            params["quant_conv"]["bias"] = bias.replace_boxed(
                bias.value.at[vae_config.latent_channels :].set(cfg.logvar_init)
            )
        if disc is None:
            return params
        size = 2 ** (cfg.disc_layers + 2)
        return {
            "vae": params,
            "disc": disc.init(jax.random.fold_in(key, 7), jnp.zeros((1, size, size, 3)))["params"],
        }

    def loss(params, frozen, batch, key, step):
        x = batch["image"]  # [B, H, W, 3] in [-1, 1]
        vae_params = params["vae"] if disc is not None else params
        recon, post = vae.apply({"params": vae_params}, x, key)
        recon = recon.astype(jnp.float32)
        err = jnp.abs(recon - x) if cfg.reconstruction == "l1" else (recon - x) ** 2
        rec = jnp.mean(err)
        kl = jnp.mean(post.kl()) / np.prod(x.shape[1:3])  # per pixel, like rec
        total, metrics = rec + cfg.kl_weight * kl, {"reconstruction": rec, "kl": kl}
        if disc is not None:
            on = (step >= cfg.disc_start).astype(jnp.float32)  # warm-up: reconstruction only
            d = lambda p, img: disc.apply({"params": p}, img)  # noqa: E731
            g_loss = -jnp.mean(d(jax.lax.stop_gradient(params["disc"]), recon))
            real, fake = d(params["disc"], x), d(params["disc"], jax.lax.stop_gradient(recon))
            d_loss = jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))  # hinge
            total = total + on * (cfg.disc_weight * g_loss + d_loss)
            metrics.update(g_loss=g_loss, d_loss=d_loss, disc_on=on)
        return total, metrics

    return Task("vae", init, loss, uses_step=True)

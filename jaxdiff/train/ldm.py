"""The latent-diffusion UNet task: noise prediction on frozen-VAE latents, conditioned on a text tower
(frozen or trained with it), with conditioning dropout for classifier-free guidance."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.diffusion import schedules as S
from jaxdiff.models.text import TextTransformer, eos_index
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL, scale_latents
from jaxdiff.pipelines import stable_diffusion as SD
from jaxdiff.pipelines.params import SamplingParams
from jaxdiff.train.export import scheduler_config
from jaxdiff.train.step import Task, compute_dtype, init_like


@dataclasses.dataclass(frozen=True)
class LDMConfig:
    prediction_type: str = "epsilon"  # the target: epsilon | v_prediction | sample
    min_snr_gamma: float = 0.0  # > 0: Hang et al. 2023's min-SNR-gamma loss weights
    cond_dropout: float = 0.1  # probability of training a sample on the empty prompt (CFG)
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    rescale_betas_zero_snr: bool = (
        False  # Lin et al. 2024: the last step is pure noise (needs v_prediction)
    )
    timestep_spacing: str = (
        "leading"  # the exported sampler's: trailing starts sampling at t = T - 1
    )
    compute_dtype: str = "float32"  # bfloat16: bf16 compute, fp32 master params
    remat: bool = False  # recompute UNet blocks in the backward pass (less memory)
    train_text_encoder: bool = (
        False  # True: fine-tune the text encoder with the UNet (params {unet, text_encoder})
    )
    # a portion of each batch draws t from [timestep_bias_begin, T) instead of [0, T) (diffusers' training
    # scripts call this a "later" timestep bias): the noisiest steps, where the prompt alone decides the layout
    timestep_bias_portion: float = 0.0
    timestep_bias_begin: int = 0
    # > 0 (needs train_text_encoder): add this times a token-identity loss on the trained text encoder: each
    # prompt token, up to the first end token, decoded from its last hidden state by the tower's own token
    # embedding (tied weights, cross-entropy). Trained with a UNet that does not use a word yet, the tower is
    # free to erase it (the shapes-world tower mapped "to the left of" and "to the right of" to one state);
    # this keeps every word's identity in the states the UNet reads
    text_token_loss: float = 0.0


def sample_timesteps(key, n: int, cfg: LDMConfig):
    """[n] training timesteps: uniform over [0, T), a ``timestep_bias_portion`` of them (in expectation)
    uniform over [timestep_bias_begin, T) instead."""
    t = jax.random.randint(key, (n,), 0, cfg.num_train_timesteps)
    if cfg.timestep_bias_portion > 0:
        k_late, k_pick = jax.random.split(jax.random.fold_in(key, 1))
        late = jax.random.randint(k_late, (n,), cfg.timestep_bias_begin, cfg.num_train_timesteps)
        t = jnp.where(jax.random.uniform(k_pick, (n,)) < cfg.timestep_bias_portion, late, t)
    return t


def text_token_ce(states, ids, embedding, text_config):
    """Mean cross-entropy of each token of ``ids`` [B, T] (up to and including the first end token) decoded
    from its state [B, T, D] by the token embedding [V, D] (tied logits ``states @ embedding.T``)."""
    logits = jnp.einsum("btd,vd->btv", states.astype(jnp.float32), embedding.astype(jnp.float32))
    end = eos_index(ids, text_config)
    mask = (jnp.arange(ids.shape[1])[None, :] <= end[:, None]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def ldm_task(
    cfg: LDMConfig,
    unet_config,
    vae_config,
    text_config,
    frozen: dict,
    uncond_ids: np.ndarray,
    init_params=None,
    sample_ids: np.ndarray | None = None,
    sample_resolution: int = 32,
    sample_params: SamplingParams | None = None,
) -> Task:
    """The UNet of a latent diffusion model; ``frozen`` = {"vae": ..., "text_encoder": ...} params.

    sample_ids: prompts' tokens [N, 77] for a sample grid (``Task.sample``) of sample_resolution px,
    drawn by the pipeline's own sampler with ``sample_params`` (default DDIM, 20 steps, w = 3).

    init_params: start from these (fine-tuning a checkpoint) instead of a random init; they are
    boxed with the UNet's logical axis names so they shard like a fresh init.
    """
    if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"prediction_type must be epsilon, v_prediction or sample, got {cfg.prediction_type!r}"
        )
    if cfg.rescale_betas_zero_snr and cfg.prediction_type == "epsilon":
        raise ValueError(
            "rescale_betas_zero_snr needs prediction_type v_prediction (or sample): at zero SNR the "
            "noise is the input itself and an epsilon model cannot say anything about the image"
        )
    if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(
            f"timestep_spacing must be leading, trailing or linspace, got {cfg.timestep_spacing!r}"
        )
    if (
        not 0 <= cfg.timestep_bias_portion <= 1
        or not 0 <= cfg.timestep_bias_begin < cfg.num_train_timesteps
    ):
        raise ValueError(
            f"timestep_bias_portion must be in [0, 1] and timestep_bias_begin in [0, "
            f"{cfg.num_train_timesteps}), got {cfg.timestep_bias_portion} and {cfg.timestep_bias_begin}"
        )
    if cfg.text_token_loss < 0 or (cfg.text_token_loss > 0 and not cfg.train_text_encoder):
        raise ValueError(
            f"text_token_loss must be >= 0 and needs train_text_encoder=True (it trains the text "
            f"encoder), got {cfg.text_token_loss} with train_text_encoder={cfg.train_text_encoder}"
        )
    dt = compute_dtype(cfg.compute_dtype)
    unet = UNet(unet_config, remat=cfg.remat, dtype=dt)
    vae = AutoencoderKL(vae_config)
    text = TextTransformer(text_config)
    sched = S.resolve(
        {
            "beta_schedule": cfg.beta_schedule,
            "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end,
            "num_train_timesteps": cfg.num_train_timesteps,
            "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
        },
        "ddpm",
    )
    alphas_cumprod = jnp.asarray(S.alphas_cumprod(sched))
    uncond = jnp.asarray(uncond_ids, jnp.int32).reshape(1, -1)
    train_text = cfg.train_text_encoder

    def init(key):
        u = init_like(unet, "unet", unet_config, key, init_params)
        if not train_text:
            return u
        # the text encoder starts from the given one (e.g. a CLIP's text tower) and trains with the UNet
        return {
            "unet": u,
            "text_encoder": init_like(
                text, "text_encoder", text_config, key, frozen["text_encoder"]
            ),
        }

    def split(params, frozen):
        """(UNet params, text-encoder params) of the trained params (and the frozen parts)."""
        return (
            (params["unet"], params["text_encoder"])
            if train_text
            else (params, frozen["text_encoder"])
        )

    def loss(params, frozen, batch, key):
        k_enc, k_t, k_eps, k_drop = jax.random.split(key, 4)
        images, ids = batch["image"], batch["tokens"]  # [B, H, W, 3] in [-1, 1], [B, 77]
        b = images.shape[0]
        # 1. z0 ~ q(z | x), scaled as the sampler expects; the VAE is fixed
        post = vae.apply({"params": frozen["vae"]}, images, method=AutoencoderKL.encode)
        z0 = jax.lax.stop_gradient(
            scale_latents(post.sample(k_enc), vae_config)
        )  # [B, H/f, W/f, C]
        # 2. conditioning dropout: a fraction of samples see the empty prompt (classifier-free guidance)
        drop = jax.random.uniform(k_drop, (b,)) < cfg.cond_dropout
        ids = jnp.where(drop[:, None], uncond, ids)
        unet_params, text_params = split(params, frozen)
        ctx = text.apply({"params": text_params}, ids)["last_hidden_state"]
        ctx = ctx if train_text else jax.lax.stop_gradient(ctx)
        # 3. x_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, t ~ U{0, ..., T - 1}
        t = sample_timesteps(k_t, b, cfg)
        eps = jax.random.normal(k_eps, z0.shape)
        ab = alphas_cumprod[t][:, None, None, None]
        x_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * eps
        out = unet.apply({"params": unet_params}, x_t, t, ctx).astype(jnp.float32)
        # 4. the target, and per-sample mean squared error
        target = {
            "epsilon": eps,
            "sample": z0,
            "v_prediction": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * z0,
        }[cfg.prediction_type]
        mse = jnp.mean((out - target) ** 2, axis=(1, 2, 3))
        # 5. min-SNR-gamma: w = min(snr, gamma) / snr for eps (/(snr + 1) for v, x1 for x0)
        w = jnp.ones((b,))
        if cfg.min_snr_gamma > 0:
            snr = ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0])
            clipped = jnp.minimum(snr, cfg.min_snr_gamma)
            w = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[
                cfg.prediction_type
            ]
        total, metrics = jnp.mean(w * mse), {}
        if cfg.text_token_loss > 0:
            ce = text_token_ce(
                ctx, ids, text_params["embeddings"]["token_embedding"]["embedding"], text_config
            )
            metrics["text_token_ce"] = ce
            total = total + cfg.text_token_loss * ce
        return total, {"mse": jnp.mean(mse), **metrics}

    sample = None
    if sample_ids is not None:
        sp = sample_params or SamplingParams(steps=20, guidance=3.0, sampler="ddim")
        sp = sp.replace(height=sample_resolution, width=sample_resolution)
        modules = SD.Modules(unet_config, vae_config, text_config, dt)
        plan = SD.make_sampling_plan(sp, modules, scheduler_config(cfg))  # checked here, not in jit
        prompts = jnp.asarray(sample_ids, jnp.int32)
        negatives = jnp.broadcast_to(uncond, prompts.shape)

        def sample(params, frozen, key):
            """Sample grid: the fixed prompts through the pipeline's sampler (jittable, no host work)."""
            unet_params, text_params = split(params, frozen)
            weights = {"unet": unet_params, "vae": frozen["vae"], "text_encoder": text_params}
            n = prompts.shape[0]
            # the loop passes the same key every time: the same noise, grid after grid
            noise = jax.random.normal(key, (n,) + plan.latent_shape)
            keys = jax.random.split(key, n)  # a stochastic sampler's step noise
            return SD.sample_images(modules, plan, weights, prompts, negatives, keys, latents=noise)

    return Task("ldm", init, loss, frozen=frozen, sample=sample)

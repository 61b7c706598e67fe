"""Stable Diffusion txt2img and img2img (SDEdit), one jitted program per shape.

Text encoding, (for img2img) VAE encoding and noising, every denoising step in one ``lax.scan``
with classifier-free guidance as one UNet call on the paired batch, and the VAE decode all run in a
single compiled function, cached per (batch, size, steps, sampler, options): a second call with the
same shapes reuses it. On a mesh the batch shards over the data axes (padded to a multiple of
their size, trimmed after) and params are replicated or FSDP-sharded.

    pipe = Pipeline.from_pretrained("path/to/diffusers-folder")
    images = pipe.txt2img("a red circle", steps=20, guidance=7.5, seed=0)   # [N, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxdiff import sharding
from jaxdiff.convert.diffusers import abstract_params
from jaxdiff.convert.pretrained import StableDiffusion, load_pretrained
from jaxdiff.diffusion import guidance as G
from jaxdiff.diffusion import samplers as SM
from jaxdiff.diffusion import schedules as S
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL, scale_latents, unscale_latents

TRACES: collections.Counter = (
    collections.Counter()
)  # traces per program (the tests check for recompiles)
_PROGRESS: dict[str, Any] = {"bar": None}


class GenerationError(ValueError):
    """A request that cannot run (bad size, strength, prompt count, latents shape ...), raised before
    anything is compiled."""


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about one compiled generation program."""

    unet: Any
    vae: Any
    text: Any
    dtype: Any
    schedule: S.Schedule
    mode: str  # "cfg" | "cond" | "uncond"
    rescale: bool  # guidance rescale on
    interval: bool  # guidance only inside a timestep interval
    stochastic: bool
    img2img: bool
    output: str  # "image" | "latent"
    clip_skip: int | None
    progress: bool
    latent_shape: tuple  # (h, w, C) of one image's latents


def _tick(k):
    bar = _PROGRESS["bar"]
    if bar is not None:
        bar.update(1)


@functools.lru_cache(maxsize=16)
def _program(st: _Program):
    kw = dict(dtype=st.dtype, param_dtype=st.dtype)
    unet, vae, text = (
        UNet(st.unet, **kw),
        AutoencoderKL(st.vae, **kw),
        TextTransformer(st.text, **kw),
    )

    def encode_text(p, ids):
        out = text.apply({"params": p}, ids)
        if st.clip_skip:
            return text.apply(
                {"params": p}, out["hidden_states"], st.clip_skip, method=TextTransformer.clip_skip
            )
        return out["last_hidden_state"]

    def run(params, ids_c, ids_u, seeds, start, scalars, arrays, enc_noise, noise):
        TRACES["generate"] += 1
        keys = jax.vmap(jax.random.key)(seeds)  # one key per image: batch-independent
        draw = lambda i, shape: jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, i), shape)
        )(keys)  # noqa: E731
        ctx_c = encode_text(params["text_encoder"], ids_c) if st.mode != "uncond" else None
        ctx_u = encode_text(params["text_encoder"], ids_u) if st.mode != "cond" else None
        if st.img2img:  # SDEdit: encode, noise to the start step
            post = vae.apply({"params": params["vae"]}, start, method=AutoencoderKL.encode)
            shape = post.mean.shape[1:]
            eps_enc = draw(2, shape) if enc_noise is None else enc_noise
            z0 = scale_latents(post.mean + post.std * eps_enc, st.vae)
            eps = draw(3, shape) if noise is None else noise
            x = scalars["noise_a"] * z0 + scalars["noise_s"] * eps
        else:  # txt2img: given or seeded noise
            if start is None:
                start = jax.vmap(lambda k: jax.random.normal(k, st.latent_shape))(keys)
            x = start * scalars["init_sigma"]

        def model(x, t, ctx):
            return unet.apply({"params": params["unet"]}, x, t, ctx).astype(jnp.float32)

        denoise = G.classifier_free(
            model,
            ctx_c,
            ctx_u,
            scalars["w"],
            rescale=scalars["rescale"] if st.rescale else 0.0,
            mode=st.mode,
            interval=(scalars["t_lo"], scalars["t_hi"]) if st.interval else None,
        )
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        x = SM.sample(
            denoise,
            st.schedule,
            arrays,
            x.astype(jnp.float32),
            stochastic=st.stochastic,
            keys=step_keys,
            callback=_tick if st.progress else None,
        )
        if st.output == "latent":
            return x
        img = vae.apply(
            {"params": params["vae"]}, unscale_latents(x, st.vae), method=AutoencoderKL.decode
        )
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    return jax.jit(run)


def check_interval(interval, error=ValueError):
    """A guidance interval as (lo, hi) floats with 0 <= lo <= hi <= 1, or None; ``error`` names the problem."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise error(f"guidance_interval must be two numbers (lo, hi), got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise error(
            f"guidance_interval must have 0 <= lo <= hi <= 1 (fractions of the schedule's timesteps), "
            f"got ({lo:g}, {hi:g})"
        )
    return lo, hi


def _as_list(x, name) -> list[str]:
    if isinstance(x, str):
        return [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(p, str) for p in x) or not x:
        raise GenerationError(f"{name} must be a string or a non-empty list of strings")
    return list(x)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A loaded Stable Diffusion checkpoint ready to sample, optionally on a device mesh."""

    model: StableDiffusion
    params: dict
    mesh: Mesh | None = None

    @classmethod
    def from_pretrained(
        cls,
        folder,
        *,
        dtype=jnp.float32,
        variant: str | None = None,
        mesh: Mesh | None = None,
        param_sharding: str = "replicated",
    ) -> Pipeline:
        return cls.from_model(
            load_pretrained(folder, dtype=dtype, variant=variant),
            mesh=mesh,
            param_sharding=param_sharding,
        )

    @classmethod
    def from_model(
        cls, model: StableDiffusion, *, mesh: Mesh | None = None, param_sharding: str = "replicated"
    ) -> Pipeline:
        if model.unet_config.addition_embed_type:
            raise GenerationError(
                "this checkpoint's UNet needs added conditioning (SDXL); "
                "the SDXL pipeline is not implemented yet"
            )
        params = model.params
        if mesh is None:
            params = jax.device_put(params)  # once, not per call (no-op if already there)
        else:
            if param_sharding == "replicated":
                params = jax.device_put(params, NamedSharding(mesh, P()))
            elif param_sharding == "fsdp":
                cfgs = {
                    "unet": model.unet_config,
                    "vae": model.vae_config,
                    "text_encoder": model.text_config,
                }
                params = {
                    k: jax.device_put(
                        v,
                        sharding.param_shardings(
                            abstract_params(k, cfgs[k]), mesh, sharding.FSDP_RULES
                        ),
                    )
                    for k, v in params.items()
                }
            else:
                raise GenerationError(
                    f"param_sharding must be 'replicated' or 'fsdp', got {param_sharding!r}"
                )
        return cls(model, params, mesh)

    # ------------------------------------------------------------------ public API

    def txt2img(
        self,
        prompt,
        negative_prompt=None,
        *,
        num_images: int = 1,
        steps: int = 50,
        guidance: float = 7.5,
        sampler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        guidance_interval=None,
        clip_skip: int | None = None,
        latents=None,
        output: str = "image",
        progress: bool = False,
    ):
        """Images [N, H, W, 3] float32 in [0, 1] (or final latents [N, C, h, w] with output="latent").

        ``guidance_interval`` = (lo, hi), fractions of the training schedule's timesteps: guidance w acts
        only on the steps whose timestep t has lo <= t / T <= hi; the others run the conditional model
        alone (Kynkaanniemi et al. 2024). None (default): every step.

        ``latents``: initial noise in diffusers' layout [N, C, h, w] (before init_noise_sigma), for
        comparisons with diffusers; otherwise image i's noise comes from seed + i, so any image can
        be regenerated alone from its own seed.
        """
        height, width = self._size(height, width)
        return self._generate(
            prompt,
            negative_prompt,
            num_images,
            steps,
            guidance,
            sampler,
            seed,
            height,
            width,
            eta,
            guidance_rescale,
            guidance_interval,
            clip_skip,
            output,
            progress,
            latents=latents,
        )

    def img2img(
        self,
        image,
        prompt,
        negative_prompt=None,
        *,
        strength: float = 0.8,
        num_images: int = 1,
        steps: int = 50,
        guidance: float = 7.5,
        sampler: str | None = None,
        seed: int = 0,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        guidance_interval=None,
        clip_skip: int | None = None,
        noise=None,
        encode_noise=None,
        output: str = "image",
        progress: bool = False,
    ):
        """SDEdit (Meng et al. 2022): encode ``image`` [N, H, W, 3] (or [H, W, 3]) in [0, 1], noise it
        to ``strength`` of the schedule, denoise from there. ``noise`` / ``encode_noise`` [N, C, h, w]
        replace the seeded draws (the renoising noise and the VAE posterior sample)."""
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise GenerationError(f"strength must be in [0, 1], got {strength}")
        img = np.asarray(image, np.float32)
        if img.ndim == 3:
            img = img[None]
        if img.ndim != 4 or img.shape[-1] != 3:
            raise GenerationError(
                f"image must be [N, H, W, 3] (or [H, W, 3]) RGB, got shape {img.shape}"
            )
        if img.min() < 0 or img.max() > 1:
            raise GenerationError(
                f"image values must be in [0, 1], got [{img.min():.3g}, {img.max():.3g}]"
            )
        height, width = self._size(img.shape[1], img.shape[2])
        return self._generate(
            prompt,
            negative_prompt,
            num_images,
            steps,
            guidance,
            sampler,
            seed,
            height,
            width,
            eta,
            guidance_rescale,
            guidance_interval,
            clip_skip,
            output,
            progress,
            image=img,
            strength=float(strength),
            noise=noise,
            encode_noise=encode_noise,
        )

    # ------------------------------------------------------------------ internals

    def _size(self, height, width):
        f = self.model.vae_config.downscale
        default = self.model.unet_config.sample_size * f
        height, width = height or default, width or default
        if height % f or width % f or height <= 0 or width <= 0:
            raise GenerationError(
                f"height and width must be positive multiples of {f}, got {height}x{width}"
            )
        return int(height), int(width)

    def _generate(
        self,
        prompt,
        negative_prompt,
        num_images,
        steps,
        guidance,
        sampler,
        seed,
        height,
        width,
        eta,
        guidance_rescale,
        guidance_interval,
        clip_skip,
        output,
        progress,
        *,
        latents=None,
        image=None,
        strength=None,
        noise=None,
        encode_noise=None,
    ):
        prompts = _as_list(prompt, "prompt")
        negs = _as_list(negative_prompt, "negative_prompt") if negative_prompt is not None else [""]
        if len(negs) == 1:
            negs = negs * len(prompts)
        if len(negs) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(negs)} negative prompts")
        if not isinstance(num_images, int) or num_images < 1:
            raise GenerationError(f"num_images must be a positive integer, got {num_images}")
        if not isinstance(steps, int) or steps < 1:
            raise GenerationError(f"steps must be a positive integer, got {steps}")
        if output not in ("image", "latent"):
            raise GenerationError(f"output must be 'image' or 'latent', got {output!r}")
        if not math.isfinite(guidance):
            raise GenerationError(f"guidance must be finite, got {guidance}")
        interval = check_interval(guidance_interval, GenerationError)
        if clip_skip is not None and not 0 <= clip_skip < self.model.text_config.num_hidden_layers:
            raise GenerationError(
                f"clip_skip must be in [0, {self.model.text_config.num_hidden_layers}), got {clip_skip}"
            )
        schedule = S.resolve(self.model.scheduler_config, sampler)
        plan = SM.make_plan(schedule, steps, strength=strength, eta=eta)

        tok = self.model.tokenizer
        prompts = [p for p in prompts for _ in range(num_images)]
        negs = [n for n in negs for _ in range(num_images)]
        n = len(prompts)
        f, c = self.model.vae_config.downscale, self.model.unet_config.in_channels
        lat_nchw = (n, c, height // f, width // f)
        start = self._batch_array(latents, lat_nchw, "latents") if image is None else None
        if image is not None:
            if image.shape[0] not in (1, n):
                raise GenerationError(f"{image.shape[0]} images for {n} prompts x images")
            start = np.broadcast_to(image, (n,) + image.shape[1:]) * 2.0 - 1.0
        noise = self._batch_array(noise, lat_nchw, "noise")
        encode_noise = self._batch_array(encode_noise, lat_nchw, "encode_noise")
        seeds = (
            (np.int64(seed) + np.arange(n)).astype(np.uint32).astype(np.int32)
        )  # seed + i, wrapped to 32 bits

        st = _Program(
            self.model.unet_config,
            self.model.vae_config,
            self.model.text_config,
            jax.tree.leaves(self.params["unet"])[0].dtype,
            schedule,
            G.mode_for(guidance),
            guidance_rescale != 0,
            interval is not None and G.mode_for(guidance) == "cfg",
            plan.stochastic,
            image is not None,
            output,
            clip_skip,
            progress,
            (height // f, width // f, c),
        )
        lo, hi = (0.0, 1.0) if interval is None else interval
        T = schedule.num_train_timesteps
        scalars = {
            k: np.float32(v)
            for k, v in dict(
                w=guidance,
                rescale=guidance_rescale,
                init_sigma=plan.init_noise_sigma,
                noise_a=plan.noise_a,
                noise_s=plan.noise_s,
                t_lo=lo * T,
                t_hi=hi * T,
            ).items()
        }
        batch = dict(
            ids_c=tok(prompts),
            ids_u=tok(negs),
            seeds=seeds,
            start=None if start is None else np.asarray(start, np.float32),
            enc_noise=encode_noise,
            noise=noise,
        )
        batch = self._shard_batch(batch)
        fn = _program(st)
        if progress:
            _PROGRESS["bar"] = tqdm(
                total=plan.num_calls, desc=f"{schedule.sampler} x{plan.num_steps}", unit="step"
            )
        try:
            out = fn(
                self.params,
                batch["ids_c"],
                batch["ids_u"],
                batch["seeds"],
                batch["start"],
                scalars,
                plan.arrays,
                batch["enc_noise"],
                batch["noise"],
            )
            out = np.asarray(jax.device_get(out))[:n]
        finally:
            if _PROGRESS["bar"] is not None:
                _PROGRESS["bar"].close()
                _PROGRESS["bar"] = None
        return out.transpose(0, 3, 1, 2) if output == "latent" else out

    @staticmethod
    def _batch_array(x, nchw_shape, name):
        if x is None:
            return None
        x = np.asarray(x, np.float32)
        if x.shape != tuple(nchw_shape):
            raise GenerationError(
                f"{name} must have shape {tuple(nchw_shape)} (N, C, h, w), got {x.shape}"
            )
        return x.transpose(0, 2, 3, 1)

    def _shard_batch(self, batch: dict):
        """Pad the batch to a multiple of the mesh's data-axis size and place it sharded over them."""
        if self.mesh is None:
            return batch
        axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.shape)
        size = math.prod(self.mesh.shape[a] for a in axes)
        n = batch["seeds"].shape[0]
        pad = (-n) % size
        sharding = NamedSharding(self.mesh, P(axes))
        out = {}
        for k, v in batch.items():
            if v is None:
                out[k] = None
                continue
            if pad:
                v = np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
            out[k] = jax.device_put(v, sharding)
        return out


def load(folder, **kw) -> Pipeline:
    """Shorthand for :meth:`Pipeline.from_pretrained`."""
    return Pipeline.from_pretrained(folder, **kw)


def seeds_for(seed: int, n: int) -> Sequence[int]:
    """The seed each of n images in one call used (image i: seed + i)."""
    return [int(np.uint32(np.int64(seed) + i)) for i in range(n)]

"""Stable Diffusion txt2img and img2img (SDEdit), one jitted program per shape.

Text encoding, (for img2img) VAE encoding and noising, every denoising step in one ``lax.scan``
with classifier-free guidance as one UNet call on the paired batch, and the VAE decode all run in a
single compiled function, cached per (batch, size, steps, sampler, options): a second call with the
same shapes reuses it. On a mesh the batch shards over the data axes (padded to a multiple of
their size, trimmed after) and params are replicated or FSDP-sharded.

    pipe = Pipeline.from_pretrained("path/to/diffusers-folder")
    images = pipe.txt2img("a red circle", steps=20, guidance=7.5, seed=0)   # [N, H, W, 3] in [0, 1]
    images = pipe.txt2img("a red circle", params=SamplingParams(steps=20), seed=1)

That program's body is :func:`sample_images`, a pure function of module configs, weights, token ids,
keys and a :class:`SamplingPlan` (a ``SamplingParams`` resolved for one model): the training loop's
sample grid calls it inside its own jitted step.
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
from flax import struct
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
from jaxdiff.pipelines.params import GenerationError, SamplingParams

TRACES: collections.Counter = (
    collections.Counter()
)  # traces per program (the tests check for recompiles)
_PROGRESS: dict[str, Any] = {"bar": None}


@dataclasses.dataclass(frozen=True)
class Modules:
    """The three networks a sampling run builds: configs and compute dtype (hashable: keys programs)."""

    unet: Any
    vae: Any
    text: Any
    dtype: Any = jnp.float32


@struct.dataclass
class SamplingPlan:
    """A ``SamplingParams`` resolved for one model and scheduler config. The static fields pick the
    compiled program; ``scalars`` and ``arrays`` are traced, so a new guidance weight, interval or
    seed reuses it."""

    schedule: S.Schedule = struct.field(pytree_node=False)
    mode: str = struct.field(pytree_node=False)  # "cfg" | "cond" | "uncond"
    rescale: bool = struct.field(pytree_node=False)  # guidance rescale on
    interval: bool = struct.field(pytree_node=False)  # guidance only inside a timestep interval
    stochastic: bool = struct.field(pytree_node=False)
    img2img: bool = struct.field(pytree_node=False)
    clip_skip: int | None = struct.field(pytree_node=False)
    latent_shape: tuple = struct.field(pytree_node=False)  # (h, w, C) of one image's latents
    num_steps: int = struct.field(pytree_node=False)  # denoising steps actually run
    scalars: dict  # name -> float32 scalar
    arrays: dict  # the sampler's per-call tables (SM.Plan.arrays), scanned over

    @property
    def num_calls(self) -> int:
        return int(self.arrays["t"].shape[0])


def make_sampling_plan(
    params: SamplingParams, modules: Modules, scheduler_config: dict, *, img2img: bool = False
) -> SamplingPlan:
    """``params`` for these networks and scheduler: what depends on the model is checked here (size
    against the VAE's factor, clip_skip against the text encoder's depth, steps against the schedule),
    and the sampler's tables are computed host-side, once."""
    f = modules.vae.downscale
    default = modules.unet.sample_size * f
    height, width = params.height or default, params.width or default
    if height % f or width % f:
        raise GenerationError(
            f"height and width must be positive multiples of {f} (the VAE's factor), "
            f"got {height}x{width}"
        )
    layers = modules.text.num_hidden_layers
    if params.clip_skip is not None and params.clip_skip >= layers:
        raise GenerationError(f"clip_skip must be in [0, {layers}), got {params.clip_skip}")
    schedule = S.resolve(scheduler_config, params.sampler)
    plan = SM.make_plan(
        schedule, params.steps, strength=params.strength if img2img else None, eta=params.eta
    )
    mode = G.mode_for(params.guidance)
    lo, hi = params.guidance_interval or (0.0, 1.0)
    T = schedule.num_train_timesteps
    scalars = dict(
        w=params.guidance,
        rescale=params.guidance_rescale,
        init_sigma=plan.init_noise_sigma,
        noise_a=plan.noise_a,
        noise_s=plan.noise_s,
        t_lo=lo * T,
        t_hi=hi * T,
    )
    return SamplingPlan(
        schedule=schedule,
        mode=mode,
        rescale=params.guidance_rescale != 0,
        interval=params.guidance_interval is not None and mode == "cfg",
        stochastic=plan.stochastic,
        img2img=img2img,
        clip_skip=params.clip_skip,
        latent_shape=(height // f, width // f, modules.unet.in_channels),
        num_steps=plan.num_steps,
        scalars={k: np.float32(v) for k, v in scalars.items()},
        arrays=plan.arrays,
    )


def _tick(k):
    bar = _PROGRESS["bar"]
    if bar is not None:
        bar.update(1)


def sample_images(
    modules: Modules,
    plan: SamplingPlan,
    params: dict,
    ids_c,
    ids_u,
    keys,
    *,
    latents=None,
    image=None,
    encode_noise=None,
    noise=None,
    output: str = "image",
    progress: bool = False,
):
    """One whole sampling run; pure and traceable (call it inside jit).

    ``params`` = {"unet", "vae", "text_encoder"}; ``ids_c`` / ``ids_u`` [N, 77] the prompts' and the
    negative prompts' tokens; ``keys`` [N] one PRNG key per image (its start noise unless ``latents``
    [N, h, w, C] is given, and any step noise). img2img: ``image`` [N, H, W, 3] in [-1, 1] is encoded
    and noised to the plan's first step (``encode_noise`` / ``noise`` [N, h, w, C] replace the draws).
    Returns images [N, H, W, 3] in [0, 1], or the final latents [N, h, w, C] with output="latent".
    """
    kw = dict(dtype=modules.dtype, param_dtype=modules.dtype)
    unet, vae, text = (
        UNet(modules.unet, **kw),
        AutoencoderKL(modules.vae, **kw),
        TextTransformer(modules.text, **kw),
    )
    sc = plan.scalars

    def encode_text(ids):
        v = {"params": params["text_encoder"]}
        out = text.apply(v, ids)
        if plan.clip_skip:
            return text.apply(
                v, out["hidden_states"], plan.clip_skip, method=TextTransformer.clip_skip
            )
        return out["last_hidden_state"]

    def draw(i, shape):  # image n's i-th draw: fold_in(key_n, i), so it never depends on the batch
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(keys)

    ctx_c = encode_text(ids_c) if plan.mode != "uncond" else None
    ctx_u = encode_text(ids_u) if plan.mode != "cond" else None
    if plan.img2img:  # SDEdit: encode, noise to the start step
        post = vae.apply({"params": params["vae"]}, image, method=AutoencoderKL.encode)
        shape = post.mean.shape[1:]
        eps_enc = draw(2, shape) if encode_noise is None else encode_noise
        z0 = scale_latents(post.mean + post.std * eps_enc, modules.vae)
        eps = draw(3, shape) if noise is None else noise
        x = sc["noise_a"] * z0 + sc["noise_s"] * eps
    else:  # txt2img: given or seeded noise
        if latents is None:
            latents = jax.vmap(lambda k: jax.random.normal(k, plan.latent_shape))(keys)
        x = latents * sc["init_sigma"]

    def model(x, t, ctx):
        return unet.apply({"params": params["unet"]}, x, t, ctx).astype(jnp.float32)

    denoise = G.classifier_free(
        model,
        ctx_c,
        ctx_u,
        sc["w"],
        rescale=sc["rescale"] if plan.rescale else 0.0,
        mode=plan.mode,
        interval=(sc["t_lo"], sc["t_hi"]) if plan.interval else None,
    )
    x = SM.sample(
        denoise,
        plan.schedule,
        plan.arrays,
        x.astype(jnp.float32),
        stochastic=plan.stochastic,
        keys=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
        callback=_tick if progress else None,
    )
    if output == "latent":
        return x
    # unscale_latents undoes both the scaling and the shift factor (a VAE with shift_factor needs both)
    img = vae.apply(
        {"params": params["vae"]}, unscale_latents(x, modules.vae), method=AutoencoderKL.decode
    )
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Program:
    """What, besides the plan's static fields and the shapes, picks a compiled generation program."""

    modules: Modules
    output: str  # "image" | "latent"
    progress: bool


@functools.lru_cache(maxsize=16)
def _program(st: _Program):
    def run(params, plan, ids_c, ids_u, seeds, latents, image, encode_noise, noise):
        TRACES["generate"] += 1
        keys = jax.vmap(jax.random.key)(seeds)  # one key per image: batch-independent
        return sample_images(
            st.modules,
            plan,
            params,
            ids_c,
            ids_u,
            keys,
            latents=latents,
            image=image,
            encode_noise=encode_noise,
            noise=noise,
            output=st.output,
            progress=st.progress,
        )

    return jax.jit(run)


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

    @property
    def modules(self) -> Modules:
        m = self.model
        dtype = jax.tree.leaves(self.params["unet"])[0].dtype
        return Modules(m.unet_config, m.vae_config, m.text_config, dtype)

    # ------------------------------------------------------------------ public API

    def txt2img(
        self,
        prompt,
        negative_prompt=None,
        *,
        params: SamplingParams | None = None,
        latents=None,
        output: str = "image",
        progress: bool = False,
        **settings,
    ):
        """Images [N, H, W, 3] float32 in [0, 1] (or final latents [N, C, h, w] with output="latent").

        ``params`` (default ``SamplingParams()``) with ``settings`` replacing its fields:
        ``txt2img("a cat", steps=20, guidance=7.5, sampler="euler", seed=0)``.

        ``latents``: initial noise in diffusers' layout [N, C, h, w] (before init_noise_sigma), for
        comparisons with diffusers; otherwise image i's noise comes from seed + i, so any image can
        be regenerated alone from its own seed.
        """
        sp = (params or SamplingParams()).replace(**settings)
        return self._generate(prompt, negative_prompt, sp, output, progress, latents=latents)

    def img2img(
        self,
        image,
        prompt,
        negative_prompt=None,
        *,
        params: SamplingParams | None = None,
        noise=None,
        encode_noise=None,
        output: str = "image",
        progress: bool = False,
        **settings,
    ):
        """SDEdit (Meng et al. 2022): encode ``image`` [N, H, W, 3] (or [H, W, 3]) in [0, 1], noise it
        to ``strength`` of the schedule, denoise from there. ``params`` / ``settings`` as for txt2img
        (height and width are the image's). ``noise`` / ``encode_noise`` [N, C, h, w] replace the
        seeded draws (the renoising noise and the VAE posterior sample)."""
        sp = (params or SamplingParams()).replace(**settings)
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
        h, w = img.shape[1:3]
        if (sp.height or h, sp.width or w) != (h, w):
            raise GenerationError(
                f"height x width {sp.height}x{sp.width} differ from the image's {h}x{w}: resize the "
                "image, or leave height and width unset"
            )
        sp = sp.replace(height=h, width=w)
        return self._generate(
            prompt,
            negative_prompt,
            sp,
            output,
            progress,
            image=img,
            noise=noise,
            encode_noise=encode_noise,
        )

    # ------------------------------------------------------------------ internals

    def _generate(
        self,
        prompt,
        negative_prompt,
        sp: SamplingParams,
        output,
        progress,
        *,
        latents=None,
        image=None,
        noise=None,
        encode_noise=None,
    ):
        prompts = _as_list(prompt, "prompt")
        negs = _as_list(negative_prompt, "negative_prompt") if negative_prompt is not None else [""]
        if len(negs) == 1:
            negs = negs * len(prompts)
        if len(negs) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(negs)} negative prompts")
        if output not in ("image", "latent"):
            raise GenerationError(f"output must be 'image' or 'latent', got {output!r}")
        modules = self.modules
        plan = make_sampling_plan(
            sp, modules, self.model.scheduler_config, img2img=image is not None
        )

        tok = self.model.tokenizer
        prompts = [p for p in prompts for _ in range(sp.num_images)]
        negs = [n for n in negs for _ in range(sp.num_images)]
        n = len(prompts)
        h, w, c = plan.latent_shape
        lat_nchw = (n, c, h, w)
        latents = self._batch_array(latents, lat_nchw, "latents") if image is None else None
        if image is not None:
            if image.shape[0] not in (1, n):
                raise GenerationError(f"{image.shape[0]} images for {n} prompts x images")
            image = np.broadcast_to(image, (n,) + image.shape[1:]) * 2.0 - 1.0
        noise = self._batch_array(noise, lat_nchw, "noise")
        encode_noise = self._batch_array(encode_noise, lat_nchw, "encode_noise")
        seeds = (
            (np.int64(sp.seed) + np.arange(n)).astype(np.uint32).astype(np.int32)
        )  # seed + i, wrapped to 32 bits

        batch = dict(
            ids_c=tok(prompts),
            ids_u=tok(negs),
            seeds=seeds,
            latents=latents,
            image=None if image is None else np.asarray(image, np.float32),
            encode_noise=encode_noise,
            noise=noise,
        )
        batch = self._shard_batch(batch)
        fn = _program(_Program(modules, output, progress))
        if progress:
            _PROGRESS["bar"] = tqdm(
                total=plan.num_calls,
                desc=f"{plan.schedule.sampler} x{plan.num_steps}",
                unit="step",
            )
        try:
            out = fn(
                self.params,
                plan,
                batch["ids_c"],
                batch["ids_u"],
                batch["seeds"],
                batch["latents"],
                batch["image"],
                batch["encode_noise"],
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

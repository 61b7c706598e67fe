"""The optimiser: AdamW with warm-up + cosine decay, clipping, accumulation, frozen sub-trees, EMA."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000  # the cosine decays over these (optimiser updates, after accumulation)
    final_lr_ratio: float = 0.0  # lr at the end of the decay / peak lr
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases, norms and other 1-D params
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    accumulate: int = 1  # micro-batches per update (optax.MultiSteps)
    frozen: tuple[str, ...] = ()  # regexes over "a/b/c" param paths that are not trained
    ema_decay: float = 0.0  # 0: no EMA copy
    ema_warmup: bool = (
        True  # decay at update t: min(ema_decay, (1 + t) / (10 + t)), as diffusers' EMAModel
    )


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_mask(params, patterns) -> dict:
    """True for every leaf whose path matches one of the regexes."""
    regs = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(r.search(path_str(p)) for r in regs), params
    )


def schedule(cfg: OptimConfig):
    peak = cfg.learning_rate
    decay = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0 if cfg.warmup_steps else peak,
        peak,
        cfg.warmup_steps,
        decay,
        end_value=peak * cfg.final_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
    """The full transformation for ``params`` (needed for the masks); unknown regexes are an error."""
    if cfg.frozen:
        mask = frozen_mask(params, cfg.frozen)
        for pat in cfg.frozen:
            if not any(re.search(pat, "/".join(k)) for k in traverse_util.flatten_dict(params)):
                raise ValueError(f"optim.frozen pattern {pat!r} matches no parameter")
    decay_mask = jax.tree.map(lambda x: jnp.ndim(x) > 1, params)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        ),
    )
    if cfg.frozen:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate)
    return tx


def ema_decay_at(cfg: OptimConfig, step):
    """The EMA decay for the update after ``step`` steps: without warm-up a short run's EMA would still hold
    decay ** step of the random init (0.999 ** 2000 = e^-2: such samples are noise)."""
    if not cfg.ema_warmup:
        return jnp.asarray(cfg.ema_decay, jnp.float32)
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(cfg.ema_decay, (1 + t) / (10 + t))


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in the EMA's own dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )

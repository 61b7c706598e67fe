"""The CLIP / SigLIP task: a contrastive loss that stays exact over a batch sharded on the mesh."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdiff import sharding as sh
from jaxdiff.models import clip as clip_lib
from jaxdiff.train import contrastive
from jaxdiff.train.step import Task, boxed_like, compute_dtype


@dataclasses.dataclass(frozen=True)
class CLIPConfigTrain:
    loss: str = "softmax"  # softmax (CLIP's InfoNCE) | sigmoid (SigLIP; needs logit_bias_init)
    max_logit_scale: float = 4.6052  # t = exp(s) is clipped at 100, as CLIP does
    compute_dtype: str = "float32"


def clip_task(cfg: CLIPConfigTrain, clip_config, mesh=None, rules=None, init_params=None) -> Task:
    """CLIP's two towers on (image, caption) batches: images [B, H, W, 3] in [-1, 1], tokens [B, T].

    With a mesh, the loss sees the global batch's negatives across the batch axes of ``rules``
    (``jaxdiff.train.contrastive``: gathered InfoNCE, or the sigmoid loss on a ring)."""

    if cfg.loss not in contrastive.LOSSES:
        raise ValueError(f"clip.loss must be one of {contrastive.LOSSES}, got {cfg.loss!r}")
    if cfg.loss == "sigmoid" and clip_config.logit_bias_init is None:
        raise ValueError(
            "clip.loss=sigmoid needs a logit bias: set model.logit_bias_init (SigLIP uses -10)"
        )
    model = clip_lib.CLIP(clip_config, dtype=compute_dtype(cfg.compute_dtype))
    axes = dict(rules or sh.DATA_PARALLEL).get(sh.BATCH)

    def init(key):
        return boxed_like(
            model.init(key, *clip_lib.dummy_inputs(clip_config))["params"], init_params
        )

    def loss(params, frozen, batch, key):
        v = {"params": params}
        pixels = clip_lib.normalize(
            batch["image"] / 2 + 0.5, clip_config
        )  # [-1, 1] -> the tower's input
        img = clip_lib.l2_normalize(
            model.apply(v, pixels, method=clip_lib.CLIP.image_features)
        )  # [B, P]
        txt = clip_lib.l2_normalize(
            model.apply(v, batch["tokens"], method=clip_lib.CLIP.text_features)
        )
        scale, bias = model.apply(v, method=clip_lib.CLIP.temperature)
        scale = jnp.minimum(scale, cfg.max_logit_scale)
        loss, metrics = contrastive.contrastive_loss(
            img,
            txt,
            scale,
            bias if clip_config.logit_bias_init is not None else None,
            kind=cfg.loss,
            mesh=mesh,
            batch_axes=axes,
        )
        return loss, dict(metrics, temperature=jnp.exp(scale), logit_bias=bias)

    return Task("clip", init, loss)

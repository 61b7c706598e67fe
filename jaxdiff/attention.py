"""The one attention function every model calls: a faster kernel is a change here only."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, upcast: bool = False,
                          implementation: str | None = None):
    """Scaled dot-product attention. q: [B, T, N, H], k/v: [B, S, N, H] -> [B, T, N, H].

    ``upcast`` computes the scores and softmax in float32 (SD 2.x's ``upcast_attention``) whatever the
    compute dtype. ``implementation`` is passed to ``jax.nn.dot_product_attention`` ('cudnn' reaches
    cuDNN flash attention on GPUs; None lets JAX choose).
    """
    dtype = q.dtype
    if upcast and dtype != jnp.float32:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=implementation)
    return out.astype(dtype)

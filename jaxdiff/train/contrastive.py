"""Contrastive image-text losses, exact over the global batch when the batch is sharded over devices.

Two losses on L2-normalised embeddings img, txt [B, P] with a learnt log inverse temperature s (and
bias b for the sigmoid loss); t = exp(s):

  softmax (CLIP's symmetric InfoNCE):
      L = 1/(2B) sum_i [ logsumexp_j(t x_i.y_j) - t x_i.y_i ] + [ logsumexp_j(t x_j.y_i) - t x_i.y_i ]
  sigmoid (SigLIP, Zhai et al. 2023):
      L = -1/B sum_{i,j} log sigmoid(z_ij (t x_i.y_j + b)),  z_ij = +1 if i == j else -1

Sharded (``mesh`` with more than one device on the batch axes), inside ``jax.shard_map``:
  - softmax: each device all-gathers the other devices' embeddings ([B, P]: small) and computes only
    its own rows of both logit matrices, [B/n, B] each; the full [B, B] matrix never exists on one
    device. Both directions need a logsumexp over the *whole* batch, which the gather gives in one
    collective; the gather's transpose (a reduce-scatter) routes gradients back to their owners.
  - sigmoid: the loss is a plain sum over (i, j) pairs, so it needs no global normaliser: text chunks
    travel round a ring (``ppermute``, n - 1 hops) and each device only ever holds a [B/n, B/n] block
    of logits, as in SigLIP's chunked implementation. Memory stays flat as the batch grows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LOSSES = ("softmax", "sigmoid")


def softmax_loss(img, txt, logit_scale):
    """Symmetric InfoNCE on one device: (loss, metrics)."""
    t = jnp.exp(logit_scale)
    logits = t * img.astype(jnp.float32) @ txt.astype(jnp.float32).T  # [B, B]
    diag = jnp.diagonal(logits)
    loss_i = jax.nn.logsumexp(logits, axis=1) - diag  # image -> its caption
    loss_t = jax.nn.logsumexp(logits, axis=0) - diag  # caption -> its image
    idx = jnp.arange(logits.shape[0])
    metrics = {
        "i2t_acc": jnp.mean(jnp.argmax(logits, 1) == idx),
        "t2i_acc": jnp.mean(jnp.argmax(logits, 0) == idx),
    }
    return (jnp.mean(loss_i) + jnp.mean(loss_t)) / 2, metrics


def sigmoid_loss(img, txt, logit_scale, logit_bias):
    """SigLIP's pairwise sigmoid loss on one device: (loss, metrics)."""
    logits = jnp.exp(logit_scale) * img.astype(jnp.float32) @ txt.astype(jnp.float32).T + logit_bias
    z = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0], {}


def _gathered_softmax(img, txt, logit_scale, axes):
    # per device: img, txt [b, P]; this device's rows of the global batch start at index * b
    b = img.shape[0]
    t = jnp.exp(logit_scale)
    img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
    all_img = jax.lax.all_gather(img, axes, tiled=True)  # [B, P]
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    rows = jnp.arange(b)
    own = jax.lax.axis_index(axes) * b + rows  # global index of each row
    li = t * img @ all_txt.T  # [b, B]: image rows
    lt = t * txt @ all_img.T  # [b, B]: caption rows
    loss = jnp.sum(jax.nn.logsumexp(li, 1) - li[rows, own]) + jnp.sum(
        jax.nn.logsumexp(lt, 1) - lt[rows, own]
    )
    hits_i = jnp.sum(jnp.argmax(li, 1) == own)
    hits_t = jnp.sum(jnp.argmax(lt, 1) == own)
    n = b * jax.lax.psum(1, axes)
    loss, hits_i, hits_t = jax.lax.psum((loss, hits_i, hits_t), axes)
    return loss / (2 * n), {"i2t_acc": hits_i / n, "t2i_acc": hits_t / n}


def _ring_sigmoid(img, txt, logit_scale, logit_bias, axes, n):
    b = img.shape[0]
    t = jnp.exp(logit_scale)
    img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)

    def block(txt_k, positives):
        logits = t * img @ txt_k.T + logit_bias  # [b, b]
        z = 2 * jnp.eye(b) * positives - 1  # +1 only on our own diagonal
        return -jnp.sum(jax.nn.log_sigmoid(z * logits))

    perm = [(i, (i + 1) % n) for i in range(n)]

    def hop(carry, _):
        txt_k, total = carry
        txt_k = jax.lax.ppermute(txt_k, axes, perm)  # the next device's captions
        return (txt_k, total + block(txt_k, 0.0)), None

    (_, total), _ = jax.lax.scan(hop, (txt, block(txt, 1.0)), None, length=n - 1)
    return jax.lax.psum(total, axes) / (b * n), {}


def contrastive_loss(
    img, txt, logit_scale, logit_bias=None, *, kind: str = "softmax", mesh=None, batch_axes=None
):
    """The global-batch loss of normalised embeddings [B, P]; (loss, metrics).

    mesh / batch_axes: the mesh and the axis (or axes) the batch is split over; with more than one
    device there the loss runs in ``jax.shard_map`` (see the module docstring), else on one device.
    """
    if kind not in LOSSES:
        raise ValueError(f"contrastive loss {kind!r}: choose one of {LOSSES}")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs a logit bias (CLIPConfig.logit_bias_init)")
    bias = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    n = math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1
    if n == 1:
        return (
            softmax_loss(img, txt, logit_scale)
            if kind == "softmax"
            else sigmoid_loss(img, txt, logit_scale, bias)
        )
    if img.shape[0] % n:
        raise ValueError(f"a batch of {img.shape[0]} does not split over {n} devices")
    spec = P(axes)
    if kind == "softmax":
        f = lambda x, y, s: _gathered_softmax(x, y, s, axes)  # noqa: E731
        return jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(P(), P()))(
            img, txt, logit_scale
        )
    f = lambda x, y, s, b: _ring_sigmoid(x, y, s, b, axes, n)  # noqa: E731
    return jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=(P(), P()))(
        img, txt, logit_scale, bias
    )

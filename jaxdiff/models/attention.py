"""The one attention function every model calls: a faster kernel is a change here only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# The CPU kernel's score block: at most this many [query, key] scores per step (32 MiB in float32,
# about one L3 cache). Measured on a 2-core EPYC (sd15 self-attention, [2, 4096, 8, 40]): a 2048 x 4096
# block ran in 0.50 s, 1024 x 4096 in 0.54 s, a whole 4096 x 4096 head in 0.89 s, and
# jax.nn.dot_product_attention's XLA path (all heads' scores at once, 1 GiB) in 2.7 s.
CPU_BLOCK_SCORES = 2048 * 4096
# Below this many scores per head the plain XLA path is as fast (measured at 64 x 64).
CPU_MIN_SCORES = 1 << 16
# What ``implementation=None`` means; benchmarks set it to compare kernels ('xla', 'cpu_blocked').
DEFAULT_IMPLEMENTATION: str | None = None


def dot_product_attention(
    q,
    k,
    v,
    *,
    mask=None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: str | None = None,
):
    """Scaled dot-product attention. q: [B, T, N, H], k/v: [B, S, N, H] -> [B, T, N, H].

    ``upcast`` computes the scores and softmax in float32 (SD 2.x's ``upcast_attention``) whatever the
    compute dtype. ``implementation`` is passed to ``jax.nn.dot_product_attention`` ('cudnn' reaches
    cuDNN flash attention on GPUs; 'xla' forces XLA's einsum-softmax-einsum) or is 'cpu_blocked' to
    force the CPU kernel below. None (or ``DEFAULT_IMPLEMENTATION`` when set) picks per platform at
    lowering time: on CPU, unmasked attention over at least ``CPU_MIN_SCORES`` scores per head runs
    ``blocked_attention``; everything else, and every other platform, runs
    ``jax.nn.dot_product_attention``.
    """
    impl = implementation or DEFAULT_IMPLEMENTATION
    plain = mask is None and not is_causal
    if impl == "cpu_blocked" and not plain:
        if implementation == "cpu_blocked":
            raise ValueError("implementation='cpu_blocked' takes no mask and no is_causal")
        impl = None  # a process-wide default does not apply to masked attention
    dtype = q.dtype
    if upcast and dtype != jnp.float32:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))

    def reference(q, k, v):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            implementation=None if impl == "cpu_blocked" else impl,
        )

    if impl == "cpu_blocked":
        out = blocked_attention(q, k, v)
    elif impl is None and plain and q.shape[1] * k.shape[1] >= CPU_MIN_SCORES:
        out = lax.platform_dependent(q, k, v, cpu=blocked_attention, default=reference)
    else:
        out = reference(q, k, v)
    return out.astype(dtype)


def blocked_attention(q, k, v, block_scores: int = CPU_BLOCK_SCORES):
    """Exact softmax(q k^T / sqrt(H)) v, one head and one block of queries at a time.

    XLA:CPU's own attention materialises every head's [T, S] scores at once (1 GiB for sd15 at 64x64
    latents) and streams them through memory several times; here each step holds one [block, S] score
    matrix, which stays in cache, and XLA fuses the score matmul, max, subtract and exp into one kernel.
    The softmax is exact (max-subtracted, normalised once after the value matmul); scores and softmax
    are float32 whatever the input dtype, like ``jax.nn.dot_product_attention``.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h)
    steps = max(1, math.ceil(t * s / block_scores))
    block = math.ceil(t / steps)
    block = min(t, -(-block // 8) * 8)  # a multiple of 8 rows (SIMD-friendly) unless it is all of T
    steps = math.ceil(t / block)
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)  # [B*N, T|S, H]
    qh, kh, vh = heads(q), heads(k), heads(v)
    if steps * block != t:  # pad the queries; the padded rows are computed and dropped
        qh = jnp.pad(qh, ((0, 0), (0, steps * block - t), (0, 0)))
    qh = qh.reshape(b * n * steps, block, h)
    head_of = jnp.arange(b * n * steps, dtype=jnp.int32) // steps
    f32 = jnp.float32

    def step(args):
        qb, i = args
        kb = lax.dynamic_index_in_dim(kh, i, keepdims=False)
        vb = lax.dynamic_index_in_dim(vh, i, keepdims=False)
        scores = lax.dot_general(qb, kb, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        e = jnp.exp((scores - scores.max(axis=-1, keepdims=True)) * scale)
        num = lax.dot_general(
            e.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=f32
        )
        return (num / e.sum(axis=-1, keepdims=True)).astype(q.dtype)

    out = lax.map(step, (qh, head_of))  # [B*N*steps, block, H]
    out = out.reshape(b, n, steps * block, h)[:, :, :t]
    return out.transpose(0, 2, 1, 3)

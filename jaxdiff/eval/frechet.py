"""A Frechet distance for the shapes world, on a fixed feature map computed in JAX (no training).

Features of an image (resized to 64 x 64, RGB in 0..255), 132 numbers:
- colour layout, 108 = 12 x 9: a soft assignment of every pixel to the 11 world colours (8 palette
  + 3 backgrounds) and an `other` class, softmax(-|rgb - colour|^2 / (2 * 25^2)) with `other` at a
  fixed distance of 60, averaged over each of the 9 cells (bands at 0.35 / 0.65 of the side);
- edge orientation, 8: Sobel gradients of luminance, undirected angle in 8 soft bins over [0, pi),
  weighted by gradient magnitude, averaged over the image (shapes differ by their edge angles);
- edge density, 9: mean gradient magnitude per cell;
- colour purity, 6: the fraction of pixels whose distance to the nearest world colour falls in the
  soft bins centred at 0, 8, 16, 32, 64, 128 (blur, noise and colour shifts move mass rightwards);
- fine texture, 1: mean |luminance - 3x3 box blur of it| (noise raises it, blur lowers it).
Orientation, purity and texture are multiplied by 10: over real images they vary 20-40x less than
the layout, so unscaled, the layout's sampling noise would hide mild blur.
Statistics and the distance are computed in float64 (`jax.enable_x64` locally):
d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots by symmetric eigh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data import shapes_world as sw

SIDE = 64
TAU = 25.0
OTHER_DISTANCE = 60.0
PURITY_CENTRES = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0)
ORIENTATION_BINS = 8
WORLD = np.concatenate(
    [
        np.array(list(sw.COLOURS.values()), np.float32),
        np.array(list(sw.BACKGROUNDS.values()), np.float32),
    ]
)  # [11, 3]
SCALE = 10.0  # on orientation, purity and texture, whose spread over real images is small
FEATURE_DIM = 12 * 9 + ORIENTATION_BINS + 9 + len(PURITY_CENTRES) + 1


def _cell_weights():
    """[64, 3]: the share of each pixel row (column) inside each band, [0, .35), [.35, .65], (.65, 1]."""
    edges = np.array([0.0, sw.BANDS[0], sw.BANDS[1], 1.0]) * SIDE
    lo, hi = np.arange(SIDE)[:, None], np.arange(SIDE)[:, None] + 1.0
    w = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, 1)
    return w / w.sum(0)


def _cells(x, w):
    """x [B, 64, 64, C] -> per-cell means [B, 9, C] (row-major cells)."""
    return jnp.einsum("bhwc,hi,wj->bijc", x, w, w).reshape(x.shape[0], 9, x.shape[-1])


@jax.jit
def _features(images):  # uint8 [B, S, S, 3]
    x = images.astype(jnp.float32)
    if x.shape[1] != SIDE:
        x = jax.image.resize(x, (x.shape[0], SIDE, SIDE, 3), "linear", antialias=True)
    b, w = x.shape[0], jnp.asarray(_cell_weights(), jnp.float32)
    # 1. colour layout
    d2 = ((x[..., None, :] - WORLD) ** 2).sum(-1)  # [B, 64, 64, 11]
    logits = jnp.concatenate([-d2, jnp.full(d2.shape[:-1] + (1,), -(OTHER_DISTANCE**2))], -1) / (
        2 * TAU**2
    )
    layout = _cells(jax.nn.softmax(logits, -1), w).reshape(b, -1)  # [B, 108]
    # 2. and 3. edges
    y = (x @ jnp.array([0.299, 0.587, 0.114])) / 255.0  # [B, 64, 64]
    yp = jnp.pad(y, ((0, 0), (1, 1), (1, 1)), mode="edge")
    sob = lambda a, b_, c: a + 2 * b_ + c  # noqa: E731
    gx = sob(yp[:, :-2, 2:], yp[:, 1:-1, 2:], yp[:, 2:, 2:]) - sob(
        yp[:, :-2, :-2], yp[:, 1:-1, :-2], yp[:, 2:, :-2]
    )
    gy = sob(yp[:, 2:, :-2], yp[:, 2:, 1:-1], yp[:, 2:, 2:]) - sob(
        yp[:, :-2, :-2], yp[:, :-2, 1:-1], yp[:, :-2, 2:]
    )
    mag = jnp.sqrt(gx**2 + gy**2 + 1e-12)
    angle = jnp.mod(jnp.arctan2(gy, gx), jnp.pi) / jnp.pi * ORIENTATION_BINS  # [0, 8)
    dist = jnp.abs(angle[..., None] - jnp.arange(ORIENTATION_BINS))
    dist = jnp.minimum(dist, ORIENTATION_BINS - dist)  # circular
    orient = (jnp.clip(1 - dist, 0, None) * mag[..., None]).mean((1, 2))  # [B, 8]
    density = _cells(mag[..., None], w)[..., 0]  # [B, 9]
    # 4. colour purity
    nearest = jnp.sqrt(d2.min(-1))  # [B, 64, 64]
    c = jnp.array(PURITY_CENTRES)
    width = jnp.diff(c, append=2 * c[-1] - c[-2])
    purity = jnp.exp(-0.5 * ((nearest[..., None] - c) / width) ** 2).mean((1, 2))  # [B, 6]
    # 5. fine texture
    box = sum(yp[:, i : i + SIDE, j : j + SIDE] for i in range(3) for j in range(3)) / 9
    texture = jnp.abs(y - box).mean((1, 2))[:, None]
    return jnp.concatenate([layout, orient * SCALE, density, purity * SCALE, texture * SCALE], -1)


def features(images, batch: int = 256) -> np.ndarray:
    """float32 [N, FEATURE_DIM] for uint8 images [N, S, S, 3] (any square S)."""
    images = np.asarray(images)
    if (
        images.ndim != 4
        or images.shape[-1] != 3
        or images.shape[1] != images.shape[2]
        or images.dtype != np.uint8
    ):
        raise ValueError(f"expected uint8 images [N, S, S, 3], got {images.dtype} {images.shape}")
    out, batch = [], min(batch, len(images))
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        if len(chunk) < batch:  # one compiled shape per image size
            chunk = np.concatenate(
                [chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], np.uint8)]
            )
        out.append(np.asarray(_features(jnp.asarray(chunk)))[: len(images) - i])
    return np.concatenate(out)


def statistics(feats):
    """(mean [D], covariance [D, D]) in float64."""
    with jax.enable_x64(True):
        f = jnp.asarray(np.asarray(feats, np.float64))
        mu = f.mean(0)
        return np.asarray(mu), np.atleast_2d(np.asarray(jnp.cov(f, rowvar=False)))


@jax.jit
def _frechet(mu1, s1, mu2, s2):
    def sqrtm_psd(a):
        lam, v = jnp.linalg.eigh((a + a.T) / 2)
        return (v * jnp.sqrt(jnp.clip(lam, 0, None))) @ v.T

    r1 = sqrtm_psd(s1)
    lam = jnp.linalg.eigvalsh(r1 @ s2 @ r1)
    trace_sqrt = jnp.sqrt(jnp.clip(lam, 0, None)).sum()  # tr (S1^1/2 S2 S1^1/2)^1/2
    return ((mu1 - mu2) ** 2).sum() + jnp.trace(s1) + jnp.trace(s2) - 2 * trace_sqrt


def frechet_distance(stats1, stats2) -> float:
    """Frechet distance between two (mean, covariance) pairs, in float64."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (*stats1, *stats2)]
        return float(_frechet(*args))


def frechet(images1, images2) -> float:
    """Frechet distance between two image sets' feature statistics (each set needs >= 2 images)."""
    for name, im in (("first", images1), ("second", images2)):
        if len(im) < 2:
            raise ValueError(
                f"the {name} image set has {len(im)} images: a covariance needs at least 2"
            )
    return frechet_distance(statistics(features(images1)), statistics(features(images2)))


def reference_images(
    split: str, n: int, resolution: int = 64, seed: int = 0, start: int = 0
) -> np.ndarray:
    """uint8 [n, S, S, 3]: examples start .. start + n - 1 of a shapes-world split."""
    return np.stack(
        [sw.render(sw.sample_scene(split, i, seed), resolution) for i in range(start, start + n)]
    )

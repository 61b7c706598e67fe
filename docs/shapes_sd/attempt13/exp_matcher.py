"""Experiment: a noise-aware caption matcher (UNet from the committed denoiser, 1 output channel, spatial
mean = logit) trained on hard negatives, then used for classifier guidance. Not product code."""

import dataclasses
import os
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.data import shapes_world as W
from jaxdiff.diffusion import schedules as S
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL, scale_latents

OPP = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
PL = {W.plural(s): s for s in W.SHAPES}


def perturb(scene, rng):
    for _ in range(20):
        out = _perturb(scene, rng)
        objs = W.parse_caption(out).objects
        if not any((o.colour, o.shape) in W.HELDOUT_PAIRS for o in objs):
            return out
    return out


def _perturb(scene, rng, force=None):
    cap = scene.caption
    words = cap.split()
    kind = scene.kind
    opts = []
    if kind == "relation":
        opts += ["rel", "rel"]
    if kind == "count":
        opts += ["count", "count"]
    opts += ["colour", "shape"]
    if any(p in cap for p in W.POSITION_PHRASES):
        opts.append("pos")
    if "small" in words or "large" in words:
        opts.append("size")
    if "background" in words:
        opts.append("bg")
    op = force or opts[rng.integers(len(opts))]
    if op == "rel":
        return cap.replace(f" {scene.relation} ", f" {OPP[scene.relation]} ")
    if op == "count":
        return ("three " + cap[4:]) if cap.startswith("two ") else ("two " + cap[6:])
    if op == "pos":
        p = next(p for p in W.POSITION_PHRASES if p in cap)
        q = [x for x in W.POSITION_PHRASES if x != p][rng.integers(8)]
        return cap.replace(p, q)
    if op == "size":
        i = next(i for i, w in enumerate(words) if w in ("small", "large"))
        words[i] = "large" if words[i] == "small" else "small"
    elif op == "bg":
        i = words.index("background") - 1
        words[i] = [b for b in W.BACKGROUNDS if b != words[i]][rng.integers(2)]
    elif op == "colour":
        idx = [i for i, w in enumerate(words) if w in W.COLOURS]
        i = idx[rng.integers(len(idx))]
        words[i] = [c for c in W.COLOURS if c != words[i]][rng.integers(7)]
    elif op == "shape":
        idx = [i for i, w in enumerate(words) if w in W.SHAPES or w in PL]
        i = idx[rng.integers(len(idx))]
        if words[i] in PL:
            words[i] = W.plural([s for s in W.SHAPES if s != PL[words[i]]][rng.integers(5)])
        else:
            words[i] = [s for s in W.SHAPES if s != words[i]][rng.integers(5)]
    out = " ".join(words)
    # fix articles a/an before the changed word
    out = (
        out.replace("a orange", "an orange")
        .replace("an red", "a red")
        .replace("an yellow", "a yellow")
    )
    for c in W.COLOURS:
        if c != "orange":
            out = out.replace(f"an {c}", f"a {c}")
    out = out.replace("a large", "a large").replace("a small", "a small")
    return out


def scenes_pool(n, mix=(0.15, 0.45, 0.3, 0.1), start=0):
    """Train-split scenes with a kind mix (single, relation, count, background)."""
    want = {k: int(round(m * n)) for k, m in zip(W.KINDS, mix)}
    out, i = [], start
    while sum(want.values()) > 0:
        s = W.sample_scene("train", i)
        if want[s.kind] > 0:
            out.append(s)
            want[s.kind] -= 1
        i += 1
    return out


def main():
    model = load_pretrained("models/shapes_sd")
    cfg = dataclasses.replace(model.unet_config, out_channels=1)
    unet, vae, text = UNet(cfg), AutoencoderKL(model.vae_config), TextTransformer(model.text_config)
    s = S.resolve(model.scheduler_config)
    ab = jnp.asarray(S.alphas_cumprod(s), jnp.float32)
    params = {"unet": dict(model.params["unet"]), "text": model.params["text_encoder"]}
    co = params["unet"]["conv_out"]
    params["unet"]["conv_out"] = {
        "kernel": jnp.zeros(co["kernel"].shape[:-1] + (1,)),
        "bias": jnp.zeros((1,)),
    }
    params = jax.tree.map(jnp.asarray, params)
    encode = jax.jit(
        lambda x: scale_latents(
            vae.apply({"params": model.params["vae"]}, x, method=AutoencoderKL.encode).mean,
            model.vae_config,
        )
    )

    def logit(p, x, t, ids):
        ctx = text.apply({"params": p["text"]}, ids)["last_hidden_state"]
        return unet.apply({"params": p["unet"]}, x, t, ctx)[..., 0].mean((1, 2))

    steps, batch, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0, lr, 50, steps, lr * 0.1), weight_decay=0.0
        ),
    )
    state = opt.init(params)

    @jax.jit
    def step(p, st, z0, ids_pos, ids_neg, key):
        k1, k2 = jax.random.split(key)
        n = z0.shape[0]
        t = jax.random.randint(k1, (n,), 0, 1000)
        a = ab[t][:, None, None, None]
        x = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * jax.random.normal(k2, z0.shape)

        def loss(p):
            lg = logit(
                p,
                jnp.concatenate([x, x]),
                jnp.concatenate([t, t]),
                jnp.concatenate([ids_pos, ids_neg]),
            )
            y = jnp.concatenate([jnp.ones(n), jnp.zeros(n)])
            l = optax.sigmoid_binary_cross_entropy(lg, y)
            acc = (lg[:n] > lg[n:]).astype(jnp.float32)
            hi = (t >= 800).astype(jnp.float32)
            return l.mean(), (acc.mean(), (acc * hi).sum() / jnp.maximum(hi.sum(), 1))

        (l, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, l, aux

    pool = scenes_pool(steps * batch // 2 + batch)
    rng = np.random.default_rng(0)
    tok = model.tokenizer
    t0, hist = time.time(), []
    for i in range(steps):
        idx = rng.integers(len(pool), size=batch)
        sc = [
            W.scene_for_caption(pool[j].caption, rng) if rng.random() < 0.5 else pool[j]
            for j in idx
        ]
        imgs = np.stack([W.render(x, 64) for x in sc]).astype(np.float32) / 127.5 - 1
        z0 = encode(jnp.asarray(imgs))
        pos = tok([x.caption for x in sc])
        neg = tok([perturb(x, rng) for x in sc])
        params, state, l, aux = step(
            params, state, z0, jnp.asarray(pos), jnp.asarray(neg), jax.random.key(i)
        )
        hist.append((float(l), float(aux[0]), float(aux[1])))
        if (i + 1) % 25 == 0:
            h = np.array(hist[-25:]).mean(0)
            print(
                f"step {i + 1} loss {h[0]:.3f} acc {h[1]:.3f} acc(t>=800) {h[2]:.3f} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (i + 1) % 250 == 0 or i + 1 == steps:
            with open("runs/matcher/params.pkl.tmp", "wb") as f:
                pickle.dump(jax.device_get(params), f)
            os.replace("runs/matcher/params.pkl.tmp", "runs/matcher/params.pkl")


if __name__ == "__main__":
    os.makedirs("runs/matcher", exist_ok=True)
    main()

"""Can a discriminator (UNet body, text states) learn 'A above B' vs 'A below B' on nearly clean latents?"""

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, "docs/shapes_sd/attempt13")
from exp_matcher import _perturb, scenes_pool

from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.data import shapes_world as W
from jaxdiff.diffusion import schedules as S
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet, grow_params
from jaxdiff.models.vae import AutoencoderKL, scale_latents

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--refiner", type=int, default=0)
ap.add_argument("--fresh", action="store_true")
ap.add_argument("--tmax", type=int, default=100)
ap.add_argument("--freeze-text", action="store_true")
ap.add_argument("--op", default="rel")
a = ap.parse_args()
model = load_pretrained("models/shapes_sd")
cfg = dataclasses.replace(model.unet_config, out_channels=1, context_refiner=a.refiner)
unet, text, vae = UNet(cfg), TextTransformer(model.text_config), AutoencoderKL(model.vae_config)
ab = jnp.asarray(S.alphas_cumprod(S.resolve(model.scheduler_config)), jnp.float32)
enc = jax.jit(
    lambda x: scale_latents(
        vae.apply({"params": model.params["vae"]}, x, method=AutoencoderKL.encode).mean,
        model.vae_config,
    )
)
fresh = __import__("flax").linen.meta.unbox(
    unet.init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, 8, 128))
    )["params"]
)
if a.fresh:
    up = fresh
else:
    up = dict(model.params["unet"])
    co = up["conv_out"]
    up["conv_out"] = {"kernel": jnp.zeros(co["kernel"].shape[:-1] + (1,)), "bias": jnp.zeros((1,))}
    if a.refiner:
        up, _, _ = grow_params(
            up, dataclasses.replace(model.unet_config, out_channels=1), fresh, cfg
        )
params = {"unet": up, "text": model.params["text_encoder"]}


def logit(p, x, t, ids):
    ctx = text.apply({"params": p["text"]}, ids)["last_hidden_state"]
    if a.freeze_text:
        ctx = jax.lax.stop_gradient(ctx)
    return unet.apply({"params": p["unet"]}, x, t, ctx)[..., 0].mean((1, 2))


opt = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(optax.linear_schedule(0, a.lr, 25), weight_decay=0.0),
)
st = opt.init(params)


@jax.jit
def step(p, st, z0, pos, neg, key):
    k1, k2 = jax.random.split(key)
    n = z0.shape[0]
    t = jax.random.randint(k1, (n,), 0, a.tmax)
    al = ab[t][:, None, None, None]
    x = jnp.sqrt(al) * z0 + jnp.sqrt(1 - al) * jax.random.normal(k2, z0.shape)

    def loss(p):
        lg = logit(p, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([pos, neg]))
        l = optax.sigmoid_binary_cross_entropy(
            lg, jnp.concatenate([jnp.ones(n), jnp.zeros(n)])
        ).mean()
        return l, (lg[:n] > lg[n:]).mean()

    (l, acc), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, l, acc


kind = {"rel": "relation", "count": "count"}.get(a.op)
pool = [s for s in scenes_pool(20000) if kind is None or s.kind == kind]
rng = np.random.default_rng(0)
t0 = time.time()
h = []
for i in range(a.steps):
    sc = [pool[j] for j in rng.integers(len(pool), size=a.batch)]
    z0 = enc(jnp.asarray(np.stack([W.render(s, 64) for s in sc]).astype(np.float32) / 127.5 - 1))
    pos = jnp.asarray(model.tokenizer([s.caption for s in sc]))
    neg = jnp.asarray(model.tokenizer([_perturb(s, rng, a.op) for s in sc]))
    params, st, l, acc = step(params, st, z0, pos, neg, jax.random.key(i))
    h.append((float(l), float(acc)))
    if (i + 1) % 25 == 0:
        m = np.mean(h[-25:], 0)
        print(f"step {i + 1} loss {m[0]:.3f} acc {m[1]:.3f} {time.time() - t0:.0f}s", flush=True)

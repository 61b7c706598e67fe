import dataclasses
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "docs/shapes_sd/attempt13")
from exp_matcher import _perturb

from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.data import shapes_world as W
from jaxdiff.diffusion import schedules as S
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL, scale_latents

model = load_pretrained("models/shapes_sd")
unet, text, vae = (
    UNet(dataclasses.replace(model.unet_config, out_channels=1)),
    TextTransformer(model.text_config),
    AutoencoderKL(model.vae_config),
)
mp = jax.tree.map(jnp.asarray, pickle.load(open(sys.argv[1], "rb")))
ab = jnp.asarray(S.alphas_cumprod(S.resolve(model.scheduler_config)), jnp.float32)
enc = jax.jit(
    lambda x: scale_latents(
        vae.apply({"params": model.params["vae"]}, x, method=AutoencoderKL.encode).mean,
        model.vae_config,
    )
)


@jax.jit
def logit(x, t, ids):
    ctx = text.apply({"params": mp["text"]}, ids)["last_hidden_state"]
    return unet.apply({"params": mp["unet"]}, x, t, ctx)[..., 0].mean((1, 2))


rng = np.random.default_rng(1)
scenes = {k: [] for k in ("rel", "count", "colour", "shape")}
i = 0
while min(len(v) for v in scenes.values()) < 96:
    s = W.sample_scene("validation", i)
    i += 1
    if s.kind == "relation":
        scenes["rel"].append(s)
    elif s.kind == "count":
        scenes["count"].append(s)
    else:
        (scenes["colour"] if i % 2 else scenes["shape"]).append(s)
for op, sc in scenes.items():
    sc = sc[:96]
    z0 = enc(jnp.asarray(np.stack([W.render(s, 64) for s in sc]).astype(np.float32) / 127.5 - 1))
    pos = jnp.asarray(model.tokenizer([s.caption for s in sc]))
    neg = jnp.asarray(model.tokenizer([_perturb(s, rng, op) for s in sc]))
    row = []
    for t in (50, 300, 600, 800, 900, 960):
        a = ab[t]
        x = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * jax.random.normal(jax.random.key(t), z0.shape)
        tt = jnp.full((96,), t)
        row.append(float((logit(x, tt, pos) > logit(x, tt, neg)).mean()))
    print(
        op,
        " ".join(f"t{t}:{r:.2f}" for t, r in zip((50, 300, 600, 800, 900, 960), row)),
        flush=True,
    )

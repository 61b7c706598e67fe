"""Attempt 14's bench: which architecture learns "A above B" vs "A below B" from nearly clean latents?

A relation-only discriminator (BCE, the negative is the caption with its relation flipped), trained on a
fixed pool of train-split relation scenes and scored on validation-split ones, so a variant that memorises
the pool is told from one that learns the rule. Experiment record, not library code; run from the
repository root:

    python docs/shapes_sd/attempt14/exp_bench.py --arch unet --text clip      # attempt 13's setting
    python docs/shapes_sd/attempt14/exp_bench.py --arch unet --text oracle    # roles made explicit
    python docs/shapes_sd/attempt14/exp_bench.py --arch joint --text clip     # joint attention, from scratch

--arch unet: the committed UNet (one output channel, zero conv_out, spatial-mean logit), or random (--fresh).
--arch joint: image patches (2x2 latent pixels) and text tokens in one transformer (SD3's MMDiT idea without
its two weight streams), mean of the image tokens -> logit; from scratch.
--text clip: the committed text tower (trainable unless --freeze-text), its last hidden states.
--text oracle: five learned tokens [colour A, shape A, relation, colour B, shape B] + position embedding:
the caption's roles handed over without a text encoder (a control, not a proposal).
--neg colour: the one-hop control (A recoloured to a colour neither object has) instead of the flipped relation;
--neg mix: a third each of flipped, A recoloured, B recoloured in training (validation: the relation only).
"""

import argparse
import dataclasses
import time

import flax.linen as nn
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
RELS = tuple(OPP)
ORACLE_VOCAB = tuple(W.COLOURS) + tuple(W.SHAPES) + RELS


def flip(caption, rel):
    return caption.replace(f" {rel} ", f" {OPP[rel]} ")


def oracle_ids(scene, rel, colour_a=None, colour_b=None):
    a, b = scene.objects[:2]
    # the caption names A first; sample_scene stores A first (checked in pool)
    return [
        ORACLE_VOCAB.index(w)
        for w in (colour_a or a.colour, a.shape, rel, colour_b or b.colour, b.shape)
    ]


def other_colour(scene):
    """A colour for A that neither object has (the one-hop control's negative)."""
    used = {o.colour for o in scene.objects}
    return [c for c in W.COLOURS if c not in used][len(scene.caption) % (len(W.COLOURS) - 2)]


def recolour(scene, which=0):
    words = scene.caption.split()
    i = 1 if which == 0 else len(words) - 2
    words[i] = other_colour(scene)
    words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
    return " ".join(words)


def negative(scene, kind, text):
    """kind 0: relation flipped; 1: A recoloured; 2: B recoloured."""
    if text == "clip":
        return flip(scene.caption, scene.relation) if kind == 0 else recolour(scene, kind - 1)
    if kind == 0:
        return oracle_ids(scene, OPP[scene.relation])
    c = other_colour(scene)
    return oracle_ids(scene, scene.relation, *((c, None) if kind == 1 else (None, c)))


class Oracle(nn.Module):
    dim: int = 128

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(len(ORACLE_VOCAB), self.dim)(ids)
        return e + self.param("pos", nn.initializers.normal(0.02), (ids.shape[1], self.dim))


class Joint(nn.Module):
    dim: int = 128
    depth: int = 4
    heads: int = 4

    @nn.compact
    def __call__(self, x, ctx):
        b, h, w, c = x.shape
        p = (
            x.reshape(b, h // 2, 2, w // 2, 2, c)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(b, h * w // 4, 4 * c)
        )
        img = nn.Dense(self.dim)(p) + self.param(
            "pos", nn.initializers.normal(0.02), (h * w // 4, self.dim)
        )
        txt = nn.Dense(self.dim)(ctx) + self.param(
            "type", nn.initializers.normal(0.02), (1, 1, self.dim)
        )
        z = jnp.concatenate([img, txt], 1)
        for _ in range(self.depth):
            y = nn.LayerNorm()(z)
            z = z + nn.MultiHeadDotProductAttention(self.heads)(y, y)
            y = nn.LayerNorm()(z)
            z = z + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(y)))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(
            nn.LayerNorm()(z[:, : img.shape[1]].mean(1))
        )[:, 0]


def pool(split, n, start=0):
    out, i = [], start
    while len(out) < n:
        s = W.sample_scene(split, i)
        if s.kind == "relation":
            o = s.objects[0]
            assert s.caption.split()[1:3] == [o.colour, o.shape], s.caption
            out.append(s)
        i += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("unet", "joint"), default="unet")
    ap.add_argument("--text", choices=("clip", "oracle"), default="clip")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--freeze-text", action="store_true")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tmax", type=int, default=100)
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument(
        "--neg",
        choices=("relation", "colour", "mix"),
        default="relation",
        help="training negatives: the relation flipped; A recoloured (a one-hop control); or a third "
        "each of flipped, A recoloured, B recoloured (validation scores the relation unless colour)",
    )
    a = ap.parse_args()

    model = load_pretrained("models/shapes_sd")
    vae = AutoencoderKL(model.vae_config)
    enc = jax.jit(
        lambda x: scale_latents(
            vae.apply({"params": model.params["vae"]}, x, method=AutoencoderKL.encode).mean,
            model.vae_config,
        )
    )
    ab = jnp.asarray(S.alphas_cumprod(S.resolve(model.scheduler_config)), jnp.float32)

    t0 = time.time()
    sets = {}
    for name, split, n in (("train", "train", a.train), ("val", "validation", 512)):
        sc = pool(split, n)
        z = np.concatenate(
            [
                np.asarray(
                    enc(
                        jnp.asarray(
                            np.stack([W.render(s, 64) for s in sc[i : i + 256]]).astype(np.float32)
                            / 127.5
                            - 1
                        )
                    )
                )
                for i in range(0, n, 256)
            ]
        )
        kinds = {"relation": [0] * n, "colour": [1] * n, "mix": [i % 3 for i in range(n)]}[a.neg]
        if name == "val" and a.neg == "mix":
            kinds = [0] * n  # validation always scores the relation
        neg = [negative(s, k, a.text) for s, k in zip(sc, kinds)]
        ids = model.tokenizer if a.text == "clip" else np.asarray
        pos = ids(
            [s.caption for s in sc] if a.text == "clip" else [oracle_ids(s, s.relation) for s in sc]
        )
        sets[name] = (z, np.asarray(pos), np.asarray(ids(neg)))
        if (
            name == "train"
        ):  # what the score on the training pool counts: the relation (or the control)
            ev = [negative(s, 1 if a.neg == "colour" else 0, a.text) for s in sc]
            sets["train-eval"] = (z, np.asarray(pos), np.asarray(ids(ev)))
    print(f"pools encoded in {time.time() - t0:.0f}s", flush=True)

    key = jax.random.key(0)
    params = {}
    if a.text == "clip":
        text = TextTransformer(model.text_config)
        params["text"] = model.params["text_encoder"]
        encode_text = lambda p, ids: text.apply({"params": p}, ids)["last_hidden_state"]  # noqa: E731
    else:
        text = Oracle()
        params["text"] = text.init(key, jnp.zeros((1, 5), jnp.int32))["params"]
        encode_text = lambda p, ids: text.apply({"params": p}, ids)  # noqa: E731
    z1 = jnp.zeros((1, 16, 16, 4))
    c1 = jnp.zeros((1, 5, 128))
    if a.arch == "unet":
        cfg = dataclasses.replace(model.unet_config, out_channels=1)
        net = UNet(cfg)
        if a.fresh:
            params["net"] = nn.meta.unbox(net.init(key, z1, jnp.zeros((1,)), c1)["params"])
        else:
            up = dict(model.params["unet"])
            co = up["conv_out"]
            up["conv_out"] = {
                "kernel": jnp.zeros(co["kernel"].shape[:-1] + (1,)),
                "bias": jnp.zeros((1,)),
            }
            params["net"] = up
        apply_net = lambda p, x, t, ctx: net.apply({"params": p}, x, t, ctx)[..., 0].mean((1, 2))  # noqa: E731
    else:
        net = Joint(depth=a.depth)
        params["net"] = net.init(key, z1, c1)["params"]
        apply_net = lambda p, x, t, ctx: net.apply({"params": p}, x, ctx)  # noqa: E731
    print("net params", sum(x.size for x in jax.tree.leaves(params["net"])), flush=True)

    def logit(p, x, t, ids):
        ctx = encode_text(p["text"], ids)
        if a.freeze_text:
            ctx = jax.lax.stop_gradient(ctx)
        return apply_net(p["net"], x, t, ctx)

    def noisy(z0, key):
        k1, k2 = jax.random.split(key)
        t = jax.random.randint(k1, (z0.shape[0],), 0, a.tmax)
        al = ab[t][:, None, None, None]
        return jnp.sqrt(al) * z0 + jnp.sqrt(1 - al) * jax.random.normal(k2, z0.shape), t

    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.linear_schedule(0, a.lr, 25), weight_decay=0.0),
    )
    st = opt.init(params)

    @jax.jit
    def step(p, st, z0, pos, neg, key):
        x, t = noisy(z0, key)
        n = z0.shape[0]

        def loss(p):
            lg = logit(
                p, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([pos, neg])
            )
            y = jnp.concatenate([jnp.ones(n), jnp.zeros(n)])
            return optax.sigmoid_binary_cross_entropy(lg, y).mean(), (lg[:n] > lg[n:]).mean()

        (l, acc), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, l, acc

    @jax.jit
    def pair_acc(p, z0, pos, neg, key):
        x, t = noisy(z0, key)
        return (logit(p, x, t, pos) > logit(p, x, t, neg)).mean()

    def evaluate(p, name):
        z, pos, neg = sets[name]
        m = min(len(z), 512)
        return np.mean(
            [
                float(
                    pair_acc(
                        p,
                        jnp.asarray(z[i : i + 128]),
                        jnp.asarray(pos[i : i + 128]),
                        jnp.asarray(neg[i : i + 128]),
                        jax.random.key(10_000 + i),
                    )
                )
                for i in range(0, m, 128)
            ]
        )

    rng = np.random.default_rng(0)
    z, pos, neg = sets["train"]
    t0, h = time.time(), []
    for i in range(a.steps):
        j = rng.integers(len(z), size=a.batch)
        params, st, l, acc = step(
            params,
            st,
            jnp.asarray(z[j]),
            jnp.asarray(pos[j]),
            jnp.asarray(neg[j]),
            jax.random.key(i),
        )
        h.append((float(l), float(acc)))
        if (i + 1) % a.eval_every == 0 or i + 1 == a.steps:
            m = np.mean(h[-a.eval_every :], 0)
            print(
                f"step {i + 1} loss {m[0]:.3f} acc {m[1]:.3f} | train-pool {evaluate(params, 'train-eval'):.3f} "
                f"val {evaluate(params, 'val'):.3f} | {time.time() - t0:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()

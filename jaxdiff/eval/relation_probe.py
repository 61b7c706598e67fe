"""Does a shapes-world model's conditional mean follow the relation word? Measured at t = T, where the
layout is decided (docs/shapes_sd.md, attempts 11 and 12).

    python -m jaxdiff.eval.relation_probe --model models/shapes_sd
    python -m jaxdiff.eval.relation_probe --model models/shapes_sd --fit-steps 300 --target mean --json out.json

At the last training timestep the UNet's x0 estimate (under guidance w) is its estimate of E[z0 | caption], the
mean latent over every image the caption allows. For object pairs (A, B) the probe compares the model's
"A above B" - "A below B" difference (and left / right) with the data's, the data's means taken over
``--renders`` renders per caption encoded by the model's VAE: the cosine of the two differences, and how
often the model's mean is nearer its own caption's data mean than the opposite caption's (chance: half).
Position phrases ("in the top left" - "in the bottom right") are measured alike, as the reference. The
model's difference is w times its conditional one (the unconditional pass cancels), so the cosines are the
same at every w > 0; the nearer-own counts are not.

``--fit-steps N`` first trains the UNet and text tower N steps (AdamW, batch ``--batch``) at t in
[T - 20, T) on relation captions of other object pairs, the v / epsilon target built either from one render
per example (``--target sample``: the usual, noisy target) or from the caption's data mean
(``--target mean``: noise-free), then measures the trained copy. ``--anchor M`` adds M examples of ordinary
training to every batch (every kind, t uniform, one render each), so that the fit must keep the rest of the
model (attempt 12). Nothing is written but ``--json`` and, with ``--save DIR``, the fitted model (to sample
it with ``jaxdiff txt2img --model DIR``).

    python -m jaxdiff.eval.relation_probe --model models/shapes_sd --fit-steps 300 --target mean --anchor 64 \
        --save /tmp/fitted
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

AXES = (("above", "below"), ("to the left of", "to the right of"))
POSITION = ("in the top left", "in the bottom right")


def object_pairs(n: int, seed: int, exclude=()) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``n`` distinct (A, B) pairs of seen colour-shape pairs with different colours, none in ``exclude``."""
    from jaxdiff.data import shapes_world as W
    rng, out = np.random.default_rng(seed), []
    seen = W.SEEN_PAIRS
    while len(out) < n:
        a, b = (seen[i] for i in rng.choice(len(seen), 2, replace=False))
        if a[0] != b[0] and (a, b) not in out and (a, b) not in exclude:
            out.append((a, b))
    return out


def _relation_scene(rng, a, b, relation):
    from jaxdiff.data import shapes_world as W
    ca, cb = W._relation_cells(rng, relation)
    objects = (W._object(rng, *a, "small", ca), W._object(rng, *b, "small", cb))
    return W.Scene("relation", W._pick(rng, tuple(W.BACKGROUNDS)), objects, "", relation)


def _position_scene(rng, a, phrase):
    from jaxdiff.data import shapes_world as W
    cell = W.POSITION_PHRASES.index(phrase)
    return W.Scene("single", W._pick(rng, tuple(W.BACKGROUNDS)), (W._object(rng, *a, "small", cell),), "")


def relation_caption(a, b, relation) -> str:
    from jaxdiff.data import shapes_world as W
    return f"{W.object_phrase(*a)} {relation} {W.object_phrase(*b)}"


class Probe:
    """A model's jitted pieces: VAE encoder, text tower, and its x0 estimate at the last timestep."""

    def __init__(self, model, resolution: int | None = None):
        import jax
        import jax.numpy as jnp

        from jaxdiff import schedules
        from jaxdiff.text import TextTransformer
        from jaxdiff.unet import UNet
        from jaxdiff.vae import AutoencoderKL, scale_latents
        s = schedules.resolve(model.scheduler_config)
        if s.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"relation probe: prediction_type {s.prediction_type!r} (v_prediction or epsilon)")
        ab = schedules.alphas_cumprod(s)
        if s.prediction_type == "epsilon" and ab[-1] == 0:
            raise ValueError("relation probe: an epsilon model on a zero-terminal-SNR schedule has no x0 at t = T")
        self.model, self.prediction = model, s.prediction_type
        self.T, self.alphas = s.num_train_timesteps, jnp.asarray(ab, jnp.float32)
        from jaxdiff.data.shapes_world import RESOLUTIONS
        self.resolution = resolution or model.unet_config.sample_size * model.latent_scale
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"relation probe: the model's UNet samples {self.resolution} px images, not a "
                             f"shapes-world size {RESOLUTIONS}; give the resolution it was trained at")
        self.latent_hw = self.resolution // model.latent_scale
        unet, vae, text = UNet(model.unet_config), AutoencoderKL(model.vae_config), TextTransformer(model.text_config)
        self.unet, self.text = unet, text
        self.encode = jax.jit(lambda p, x: scale_latents(
            vae.apply({"params": p}, x, method=AutoencoderKL.encode).mean, model.vae_config))
        self.context = lambda p, ids: text.apply({"params": p}, ids)["last_hidden_state"]

        def x0_terminal(params, ids, empty, w, key):
            n = ids.shape[0]
            x = jax.random.normal(key, (n, self.latent_hw, self.latent_hw, model.unet_config.in_channels))
            t = jnp.full((n,), self.T - 1)
            c, u = self.context(params["text_encoder"], ids), self.context(params["text_encoder"], empty)
            out_c = unet.apply({"params": params["unet"]}, x, t, c)
            out_u = unet.apply({"params": params["unet"]}, x, t, u)
            return self.x0(x, t, out_u + w * (out_c - out_u))

        self.x0_terminal = jax.jit(x0_terminal)

    def x0(self, x, t, out):
        """The x0 estimate from the UNet's output ``out`` at ``x``, timestep ``t``."""
        import jax.numpy as jnp
        a = self.alphas[t][:, None, None, None]
        if self.prediction == "v_prediction":
            return jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out
        return (x - jnp.sqrt(1 - a) * out) / jnp.sqrt(a)

    def tokens(self, captions):
        import jax.numpy as jnp
        return jnp.asarray(self.model.tokenizer(list(captions)))

    def latents(self, scenes) -> np.ndarray:
        """The VAE latents (posterior means) of ``scenes``, rendered at the VAE's size."""
        import jax.numpy as jnp

        from jaxdiff.data import shapes_world as W
        imgs = np.stack([W.render(s, self.resolution) for s in scenes])
        return np.asarray(self.encode(self.model.params["vae"], jnp.asarray(imgs, jnp.float32) / 127.5 - 1))

    def data_mean(self, scenes, batch: int = 64) -> np.ndarray:
        """The mean VAE latent of ``scenes``."""
        total = 0.0
        for i in range(0, len(scenes), batch):
            total = total + self.latents(scenes[i:i + batch]).sum(0)
        return total / len(scenes)

    def model_mean(self, params, caption: str, w: float, noises: int) -> np.ndarray:
        import jax
        return np.asarray(self.x0_terminal(params, self.tokens([caption] * noises), self.tokens([""] * noises),
                                           w, jax.random.key(1))).mean(0)


def _cos(a, b) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def alignment(probe: Probe, params, pairs, weights=(1.0, 3.0), renders: int = 96, noises: int = 8,
              seed: int = 0) -> dict:
    """Per axis and w: the cosine of the model's and the data's mean difference for each pair, and how many
    captions' model means lie nearer their own data mean than the opposite caption's."""
    rng = np.random.default_rng(seed)
    out = {}
    for axis in AXES + (POSITION,):
        data = {}
        for a, b in pairs:
            for r in axis:
                scenes = [_position_scene(rng, a, r) if axis is POSITION else _relation_scene(rng, a, b, r)
                          for _ in range(renders)]
                data[(a, b, r)] = probe.data_mean(scenes)
        for w in weights:
            cosines, nearer = [], 0
            for a, b in pairs:
                caption = _caption_fn(axis, a, b)
                m = {r: probe.model_mean(params, caption(r), w, noises) for r in axis}
                d = {r: data[(a, b, r)] for r in axis}
                cosines.append(_cos(m[axis[0]] - m[axis[1]], d[axis[0]] - d[axis[1]]))
                nearer += sum(np.linalg.norm(m[r] - d[r]) < np.linalg.norm(m[r] - d[o])
                              for r, o in (axis, axis[::-1]))
            out[f"{axis[0]} / {axis[1]}, w={w:g}"] = {"cosines": [round(c, 4) for c in cosines],
                                                      "mean_cosine": round(float(np.mean(cosines)), 4),
                                                      "nearer_own": int(nearer), "captions": 2 * len(pairs)}
    return out


def _caption_fn(axis, a, b):
    from jaxdiff.data import shapes_world as W
    if axis is POSITION:
        return lambda r: f"{W.object_phrase(*a)} {r}"
    return lambda r: relation_caption(a, b, r)


def fit_terminal(probe: Probe, pairs, *, target: str, steps: int, batch: int = 64, lr: float = 3e-4,
                 renders: int = 48, seed: int = 0, progress: bool = True, anchor: int = 0,
                 cond_dropout: float = 0.1):
    """The model's UNet and text tower trained ``steps`` steps at t in [T - 20, T) on the relation captions
    of ``pairs``, the target from one render per example ("sample") or the caption's data mean ("mean").
    ``anchor`` > 0 adds that many examples of ordinary training to every batch (train-split scenes of every
    kind, t uniform over [0, T), one render each, ``cond_dropout`` of them on the empty caption), which keeps
    the rest of the model while the relation is fitted. Returns (params, losses every step)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    from jaxdiff.data import shapes_world as W
    rng = np.random.default_rng(seed)
    caps = [(a, b, r) for a, b in pairs for r in W.RELATIONS]
    ids = np.asarray(probe.model.tokenizer([relation_caption(*c) for c in caps]))
    means = np.stack([probe.data_mean([_relation_scene(rng, *c) for _ in range(renders)]) for c in caps]) \
        if target == "mean" else None
    params = {k: probe.model.params[k] for k in ("unet", "text_encoder")}
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr / 10),
                      weight_decay=0.01)
    state = opt.init(params)

    empty = np.asarray(probe.model.tokenizer([""]))[0]

    @jax.jit
    def step(params, state, tok, z0, key, n_anchor):
        k1, k2, k3 = jax.random.split(key, 3)
        n = tok.shape[0]
        t = jax.random.randint(k1, (n,), probe.T - 20, probe.T)
        t = jnp.where(jnp.arange(n) >= n - n_anchor, jax.random.randint(k3, (n,), 0, probe.T), t)
        eps = jax.random.normal(k2, z0.shape)
        a = probe.alphas[t][:, None, None, None]
        x = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps
        goal = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * z0 if probe.prediction == "v_prediction" else eps

        def loss(p):
            out = probe.unet.apply({"params": p["unet"]}, x, t, probe.context(p["text_encoder"], tok))
            return jnp.mean((out - goal) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for i in tqdm(range(steps), desc=f"fitting at t = T ({target} target)", disable=not progress):
        idx = rng.integers(0, len(caps), batch)
        z0 = means[idx] if means is not None else probe.latents([_relation_scene(rng, *caps[j]) for j in idx])
        tok = ids[idx]
        if anchor:
            scenes = [W.sample_scene("train", int(j), seed) for j in rng.integers(0, 10 ** 6, anchor)]
            a_ids = np.asarray(probe.model.tokenizer([sc.caption for sc in scenes]))
            a_ids[rng.random(anchor) < cond_dropout] = empty
            z0, tok = np.concatenate([z0, probe.latents(scenes)]), np.concatenate([tok, a_ids])
        params, state, value = step(params, state, jnp.asarray(tok), jnp.asarray(z0), jax.random.key(i), anchor)
        losses.append(float(value))
    return params, losses


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jaxdiff.eval.relation_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes_sd")
    ap.add_argument("--resolution", type=int, help="image size (default: the UNet's sample size)")
    ap.add_argument("--pairs", type=int, default=8, help="object pairs measured")
    ap.add_argument("--renders", type=int, default=96, help="renders per caption for the data's mean")
    ap.add_argument("--noises", type=int, default=8, help="noises per caption for the model's mean")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--fit-steps", type=int, default=0, help="train this many steps at t = T first")
    ap.add_argument("--fit-pairs", type=int, default=60, help="object pairs trained on (none of those measured)")
    ap.add_argument("--target", choices=("sample", "mean"), default="sample")
    ap.add_argument("--anchor", type=int, default=0,
                    help="with --fit-steps: this many examples of ordinary training (every t, every kind) per batch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--save", help="with --fit-steps: write the fitted model here (a model folder, as --model)")
    ap.add_argument("--overwrite", action="store_true", help="let --save replace an existing folder")
    args = ap.parse_args(argv)
    for name in ("pairs", "renders", "noises", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.fit_steps < 0 or args.fit_pairs < 1 or args.anchor < 0:
        ap.error("--fit-steps and --anchor must be >= 0 and --fit-pairs >= 1")
    if args.json and not Path(args.json).parent.is_dir():
        ap.error(f"--json: folder {Path(args.json).parent} does not exist")
    if args.save and not args.fit_steps:
        ap.error("--save writes the fitted model: give --fit-steps too")
    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()) and not args.overwrite:
        ap.error(f"--save: {args.save} exists and is not empty (pass --overwrite to replace it)")
    from jaxdiff.pretrained import load_pretrained
    try:
        probe = Probe(load_pretrained(args.model), args.resolution)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"relation probe: {e}") from None
    t0 = time.perf_counter()
    measured = object_pairs(args.pairs, args.seed)
    params, result = probe.model.params, {"model": args.model, "pairs": [list(map(list, p)) for p in measured]}
    if args.fit_steps:
        fit = object_pairs(args.fit_pairs, args.seed + 1, exclude=measured)
        params, losses = fit_terminal(probe, fit, target=args.target, steps=args.fit_steps, batch=args.batch,
                                      lr=args.lr, seed=args.seed, anchor=args.anchor)
        params = {**probe.model.params, **params}
        result["fit"] = {"target": args.target, "steps": args.fit_steps, "pairs": len(fit), "lr": args.lr,
                         "batch": args.batch, "anchor": args.anchor, "loss_first_10": float(np.mean(losses[:10])),
                         "loss_last_10": float(np.mean(losses[-10:]))}
        print(f"fit ({args.target} target): loss {result['fit']['loss_first_10']:.4f} -> "
              f"{result['fit']['loss_last_10']:.4f} (means of the first and last 10 steps)")
        if args.save:
            import dataclasses

            from jaxdiff.pretrained import save_pretrained
            save_pretrained(dataclasses.replace(probe.model, params=params), args.save,
                            tokenizer_folder=Path(args.model) / "tokenizer", overwrite=args.overwrite)
            print(f"wrote the fitted model to {args.save}")
    result["alignment"] = alignment(probe, params, measured, tuple(args.guidance), args.renders, args.noises,
                                    args.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print("| difference, w | cosine with the data's, per pair | mean | nearer its own data mean |")
    print("|---|---|---|---|")
    for key, row in result["alignment"].items():
        print(f"| {key} | {' '.join(f'{c:.2f}' for c in row['cosines'])} | {row['mean_cosine']:.2f} | "
              f"{row['nearer_own']} of {row['captions']} |")
    if args.json:
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    print(f"({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

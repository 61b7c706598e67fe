"""CLIP evaluation: zero-shot classification, image-text retrieval recall@k, CLIP score.

    jaxdiff eval clip --model runs/clip_shapes --split heldout [--n 1000]     # shapes world
    jaxdiff eval clip --model DIR --data folder:IMAGES [--n 1000]              # retrieval on your data
    jaxdiff eval clip-score --model DIR --images OUT [--prompt TEXT]           # generated images

A model is a ``jaxdiff train`` CLIP workdir (clip.json, tokenizer/, checkpoints/) or a transformers
``CLIPModel`` folder (config.json, weights, tokenizer files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxdiff.convert.runs import load_clip
from jaxdiff.data import pipeline as pl
from jaxdiff.data import shapes_world as sw
from jaxdiff.models import clip as clip_lib
from jaxdiff.tokenizer import Tokenizer


@dataclasses.dataclass
class Model:
    """A loaded CLIP: embeds images (uint8 or [0, 1], any size) and texts into its unit sphere."""

    config: clip_lib.CLIPConfig
    params: Any
    tokenizer: Any
    batch_size: int = 256
    tokenizer_folder: Any = None

    def __post_init__(self):
        self._img, self._txt = clip_lib.embed_fns(self.config)

    def embed_images(self, images) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            pixels = clip_lib.preprocess(chunk, self.config)
            out.append(
                np.asarray(self._img(self.params, _pad(pixels, self.batch_size)))[: len(chunk)]
            )
        return np.concatenate(out) if out else np.zeros((0, self.config.projection_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = list(texts[i : i + self.batch_size])
            ids = self.tokenizer(chunk)
            out.append(np.asarray(self._txt(self.params, _pad(ids, self.batch_size)))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.config.projection_dim), np.float32)


def _pad(x, n):
    # one compiled shape for every chunk: pad the last one up to the batch size
    x = np.asarray(x)
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)])


def load(path, batch_size: int = 256) -> Model:
    """A ``jaxdiff train`` CLIP workdir (its newest checkpoint) or a transformers CLIPModel folder."""
    config, params, tok_dir = load_clip(path)
    tok = Tokenizer(tok_dir, max_length=config.text.max_position_embeddings)
    return Model(config, jax.device_put(params), tok, batch_size, tok_dir)


# --- metrics on embeddings --------------------------------------------------------------------------


def class_embeddings(model: Model, class_texts: Sequence[Sequence[str]]) -> np.ndarray:
    """One unit vector per class: the normalised mean of its prompts' embeddings (prompt ensembling)."""
    flat = [t for texts in class_texts for t in texts]
    emb = model.embed_texts(flat)
    out, i = [], 0
    for texts in class_texts:
        m = emb[i : i + len(texts)].mean(0)
        out.append(m / np.linalg.norm(m))
        i += len(texts)
    return np.stack(out)


def zero_shot(
    image_emb: np.ndarray, labels: Sequence[int], class_emb: np.ndarray, names=None
) -> dict:
    """Top-1 accuracy of the nearest class embedding, overall and per class."""
    labels = np.asarray(labels)
    pred = np.argmax(image_emb @ class_emb.T, axis=1)
    names = names or [str(i) for i in range(len(class_emb))]
    per = {
        n: float(np.mean(pred[labels == c] == c))
        for c, n in enumerate(names)
        if np.any(labels == c)
    }
    return {"accuracy": float(np.mean(pred == labels)), "n": int(len(labels)), "per_class": per}


def retrieval(
    image_emb: np.ndarray, text_emb: np.ndarray, captions: Sequence[str], ks=(1, 5, 10)
) -> dict:
    """Recall@k both ways for paired (image i, caption i). A retrieved item counts as a hit when its
    caption equals the query's caption: identical captions (common in a small world) are not misses."""
    captions = np.asarray(captions)
    same = captions[:, None] == captions[None, :]  # [N, N]: caption i == caption j
    sim = image_emb @ text_emb.T  # [N images, N texts]
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        order = np.argsort(-s, axis=1, kind="stable")
        hit = np.take_along_axis(same, order, axis=1)  # [N, N] ranked hits
        out[name] = {f"R@{k}": float(np.mean(hit[:, :k].any(1))) for k in ks}
    out["n"] = int(len(captions))
    return out


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per pair 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics computes it)."""
    return 100 * np.maximum(np.sum(image_emb * text_emb, axis=1), 0)


# --- the shapes world -------------------------------------------------------------------------------


def shapes_world_report(model: Model, split: str = "heldout", n: int = 1000, seed: int = 0) -> dict:
    """Zero-shot colour and shape (scenes whose objects share one colour and shape, i.e. single,
    background and count scenes), and retrieval recall@k on ``n`` rendered examples of ``split``."""

    if split not in sw.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(sw.SPLITS)}")
    res = model.config.vision.image_size if model.config.vision.image_size in sw.RESOLUTIONS else 64
    scenes = [sw.sample_scene(split, i, seed) for i in range(n)]
    images = np.stack([sw.render(s, res) for s in scenes])
    captions = [s.caption for s in scenes]
    img_emb, txt_emb = model.embed_images(images), model.embed_texts(captions)
    report = {
        "split": split,
        "n": n,
        "seed": seed,
        "resolution": res,
        "retrieval": retrieval(img_emb, txt_emb, captions),
    }
    one = [i for i, s in enumerate(scenes) if len({(o.colour, o.shape) for o in s.objects}) == 1]
    colours, shapes = list(sw.COLOURS), list(sw.SHAPES)
    # prompts in the captions' own grammar, ensembled over the attribute not asked about
    by_colour = [[sw.object_phrase(c, s) for s in shapes] for c in colours]
    by_shape = [[sw.object_phrase(c, s) for c in colours] for s in shapes]
    for name, classes, texts, attr in (
        ("colour", colours, by_colour, "colour"),
        ("shape", shapes, by_shape, "shape"),
    ):
        labels = [classes.index(getattr(scenes[i].objects[0], attr)) for i in one]
        report[f"zero_shot_{name}"] = zero_shot(
            img_emb[one], labels, class_embeddings(model, texts), classes
        )
    report["clip_score"] = float(np.mean(clip_score(img_emb, txt_emb)))
    return report


def format_report(r: dict) -> str:
    lines = []
    if "split" in r:
        lines.append(f"shapes world, split {r['split']}, {r['n']} examples at {r['resolution']} px")
        for name in ("colour", "shape"):
            z = r[f"zero_shot_{name}"]
            lines.append(
                f"  zero-shot {name:6s} accuracy {100 * z['accuracy']:5.1f} %  ({z['n']} one-kind scenes)"
            )
    rr = r["retrieval"]
    for way in ("text_to_image", "image_to_text"):
        lines.append(
            f"  {way.replace('_', ' '):13s} "
            + "  ".join(f"{k} {100 * v:5.1f} %" for k, v in rr[way].items())
            + f"  (among {rr['n']})"
        )
    lines.append(f"  CLIP score (matched pairs) {r['clip_score']:.2f}")
    return "\n".join(lines)


def folder_report(model: Model, source: str, n: int = 1000) -> dict:
    """Retrieval recall@k and CLIP score on the first ``n`` (image, caption) pairs of a data source."""

    size = model.config.vision.image_size
    src = pl.open_source(source, resolution=size)
    decode = pl.DecodeExample(size)  # what training reads: centre crop + resize
    images, captions = [], []
    for i in range(min(n, len(src))):
        ex = decode(src[i])
        if ex is not None:
            images.append(ex["image"])
            captions.append(ex["caption"])
    if not images:
        raise ValueError(f"{source}: no readable (image, caption) pairs")
    img_emb, txt_emb = model.embed_images(images), model.embed_texts(captions)
    return {
        "source": source,
        "n": len(images),
        "retrieval": retrieval(img_emb, txt_emb, captions),
        "clip_score": float(np.mean(clip_score(img_emb, txt_emb))),
    }

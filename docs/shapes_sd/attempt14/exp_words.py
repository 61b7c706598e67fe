"""How far apart does a model's text encoder keep two captions that differ in one word? Relative L2 distance
of the changed word's state (|h - h'| / |h|), in the token embeddings and in the last hidden state the UNet
reads, averaged over 8 object pairs. Experiment record, not library code; run from the repository root:

    python docs/shapes_sd/attempt14/exp_words.py models/shapes_sd [runs/OTHER_EXPORT ...]
"""

import re
import sys

import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.models.text import TextTransformer

PAIRS = [
    ("red circle", "blue square"),
    ("green star", "yellow cross"),
    ("purple diamond", "orange triangle"),
    ("cyan square", "pink circle"),
    ("blue star", "red diamond"),
    ("yellow circle", "green triangle"),
    ("pink cross", "cyan star"),
    ("orange square", "purple circle"),
]
SWAPS = [  # (name, caption with {a} {b}, word, replacement)
    ("above / below (relation)", "a {a} above a {b}", "above", "below"),
    ("left / right (relation)", "a {a} to the left of a {b}", "left", "right"),
    ("top / bottom (position)", "a {a} at the top", "top", "bottom"),
    ("left / right (position)", "a {a} on the left", "left", "right"),
    ("two / three (count)", "two {a}s", "two", "three"),
    ("red / blue (colour of A)", "a red {sa} above a {b}", "red", "blue"),
]


def article(p):
    return ("an " if p[0] in "aeiou" else "a ") + p


def main(folders):
    for folder in folders:
        m = load_pretrained(folder)
        text = TextTransformer(m.text_config)
        print(f"\n{folder}\n| words | embeddings | last hidden state |\n|---|---|---|")
        for name, tmpl, w, w2 in SWAPS:
            emb, last = [], []
            for a, b in PAIRS:
                cap = (
                    tmpl.format(a=a, b=b, sa=a.split()[1])
                    .replace("a " + a, article(a), 1)
                    .replace("a " + b, article(b))
                )
                other = re.sub(rf"\b{w}\b", w2, cap, count=1)
                ids = np.asarray(m.tokenizer([cap, other]))
                diff = np.nonzero(ids[0] != ids[1])[0]
                assert len(diff) == 1, (cap, other)
                k = int(diff[0])
                out = text.apply({"params": m.params["text_encoder"]}, jnp.asarray(ids))
                for store, h in ((emb, out["hidden_states"][0]), (last, out["last_hidden_state"])):
                    h = np.asarray(h)
                    store.append(np.linalg.norm(h[0, k] - h[1, k]) / np.linalg.norm(h[0, k]))
            print(f"| {name} | {np.mean(emb):.2f} | {np.mean(last):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["models/shapes_sd"])

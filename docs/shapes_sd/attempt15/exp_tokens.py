"""Which tokens of a relation caption carry the relation? For "A above B" against "A below B" (and "to the
left of" / "to the right of"), the relative L2 distance |h - h'| / |h| of every token's last hidden state
(what the UNet's cross-attention reads), averaged over attempt 14's 8 object pairs. With a causal tower only
the relation word and the tokens after it (B's article, colour and shape, the end token) can differ.
Experiment record, not library code; run from the repository root:

    python docs/shapes_sd/attempt15/exp_tokens.py models/shapes_sd [runs/OTHER_EXPORT ...]
"""

import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "attempt14"))
from exp_words import PAIRS, article  # noqa: E402

from jaxdiff.convert.pretrained import load_pretrained  # noqa: E402
from jaxdiff.models.text import TextTransformer, eos_index  # noqa: E402

SWAPS = [("above", "below"), ("to the left of", "to the right of")]


def main(folders):
    for folder in folders:
        m = load_pretrained(folder)
        text = TextTransformer(m.text_config)
        print(f"\n{folder}")
        for r1, r2 in SWAPS:
            parts = {"A": [], r1: [], "B": [], "<end>": []}
            for a, b in PAIRS:
                caps = [f"{article(a)} {r} {article(b)}" for r in (r1, r2)]
                ids = jnp.asarray(m.tokenizer(caps))
                h = np.asarray(
                    text.apply({"params": m.params["text_encoder"]}, ids)["last_hidden_state"]
                )
                d = np.linalg.norm(h[0] - h[1], axis=-1) / np.linalg.norm(h[0], axis=-1)
                cut = [
                    int(eos_index(jnp.asarray(m.tokenizer([s])), m.text_config)[0])
                    for s in (article(a), f"{article(a)} {r1}", caps[0])
                ]  # ends of A, relation, B (+1 start)
                for name, lo, hi in (
                    ("A", 1, cut[0]),
                    (r1, cut[0], cut[1]),
                    ("B", cut[1], cut[2]),
                    ("<end>", cut[2], cut[2] + 1),
                ):
                    parts[name].append(d[lo:hi].mean())
            print(
                f"| {r1} / {r2} | "
                + " | ".join(f"{k} {np.mean(v):.2f}" for k, v in parts.items())
                + " |"
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["models/shapes_sd"])

"""Attempt 15's fine-tune: attempt 14's two halves together. The canonical relation layouts of
`attempt14/train_canon.py` (`A above B`: A in the top row, B in the bottom row; `A to the left of B`: A in the
left column, B in the right one; every scene still satisfies its caption) on top of the token-identity run
(`configs/ldm_shapes_words.py`, whose text tower names the relation words again), started from that run's
step-2,241 export and keeping its token-identity loss.

Experiment record, not library code. Run from the repository root:

    jaxdiff export --workdir runs/ldm_shapes_words --out runs/words_2200 --overwrite
    python docs/shapes_sd/attempt15/train_canon_words.py --workdir runs/a15_canon_words [--config.loop.steps=N ...]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "attempt14"))
import train_canon  # noqa: E402,F401  (patches shapes_world's relation layouts, in render workers too)

if __name__ == "__main__":
    from jaxdiff.train.cli import main

    main(
        [
            "--config",
            "configs/ldm_shapes_words.py",
            "--config.model.model_dir=runs/words_2200",
            *sys.argv[1:],
        ]
    )

"""Attempt 14's fine-tune: stage 6's recipe (`configs/ldm_shapes_rel.py`) on relation scenes drawn with
*canonical* layouts: `A above B` puts A in the top row and B in the bottom row (columns any), `A to the left
of B` A in the left column and B in the right one (rows any); the other two mirror them. Every such scene
still satisfies its caption by the spec's rule; what changes is that "A above B" now means "A at the top, B
at the bottom" in every training image, the one-hop association that the model already learns for position
phrases ("a red circle at the top"), instead of a comparison of two rows it has to make itself.

Experiment record, not library code (it patches `shapes_world._relation_cells` for the training data only;
evaluation reads captions and scores images by the spec's rule). Run from the repository root:

    python docs/shapes_sd/attempt14/train_canon.py --workdir runs/a14_canon [--config.loop.steps=1200 ...]
"""
import sys

from jaxdiff.data import shapes_world as W


def canonical_cells(rng, relation):
    first, second = (0, 2) if relation in ("to the left of", "above") else (2, 0)
    other_a, other_b = W._pick(rng, (0, 1, 2)), W._pick(rng, (0, 1, 2))
    if relation in ("to the left of", "to the right of"):           # cell = 3 * row + column
        return 3 * other_a + first, 3 * other_b + second
    return 3 * first + other_a, 3 * second + other_b


W._relation_cells = canonical_cells  # also in spawned render workers: they re-import this file

if __name__ == "__main__":
    from jaxdiff.train.cli import main
    main(["--config", "configs/ldm_shapes_rel.py", *sys.argv[1:]])

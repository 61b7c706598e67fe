"""Attempt 14's fine-tune: stage 6's recipe (`configs/ldm_shapes_rel.py`) on relation scenes drawn with
*canonical* layouts: `A above B` puts A in the top row and B in the bottom row (columns any), `A to the left
of B` A in the left column and B in the right one (rows any); the other two mirror them. Every such scene
still satisfies its caption by the spec's rule; what changes is that "A above B" now means "A at the top, B
at the bottom" in every training image, the one-hop association that the model already learns for position
phrases ("a red circle at the top"), instead of a comparison of two rows it has to make itself.

Experiment record, not library code (it patches `shapes_world._relation_cells` for the training data only;
evaluation reads captions and scores images by the spec's rule). The library has the layout since session 18:
`--config.data.source=shapes_world_memory:N:...,canonical=1` trains on the same scenes without this patch. Run from the repository root:

    python docs/shapes_sd/attempt14/train_canon.py --workdir runs/a14_canon [--config.loop.steps=1200 ...]
"""

import sys

from jaxdiff.data import shapes_world as W


def canonical_cells(rng, relation, canonical=False):
    # written here in session 17; session 18 moved it into the library as `canonical=True` (same draws)
    return _spec_cells(rng, relation, canonical=True)


_spec_cells = W._relation_cells
W._relation_cells = canonical_cells  # also in spawned render workers: they re-import this file

if __name__ == "__main__":
    from jaxdiff.train.cli import main

    main(["--config", "configs/ldm_shapes_rel.py", *sys.argv[1:]])

"""The shapes-world Stable Diffusion, attempt 15: the token-identity run (`configs/ldm_shapes_words.py`, whose text
tower names the relation words again) fine-tuned on relation scenes in their *canonical* layout
(`shapes_world_memory:N:...,canonical=1`: "A above B" draws A in the top row and B in the bottom one, "A to the
left of B" A in the left column and B in the right one; every scene still true to its caption), on the 2-core CPU.

The chain as it ran (session 17, then session 18, 2026-12-07), from the committed stage 5:

    jaxdiff train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words            # 800 steps
    jaxdiff train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words \
        --config.loop.steps=1500 --config.optim.total_steps=1500                                  # resumed
    jaxdiff train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words \
        --config.loop.steps=2241 --config.optim.total_steps=2500                                  # resumed
    jaxdiff export --workdir runs/ldm_shapes_words --out runs/ldm_shapes_words_export
    jaxdiff train --config configs/ldm_shapes_canon.py:first --workdir runs/ldm_shapes_canon_first   # 800 steps
    jaxdiff export --workdir runs/ldm_shapes_canon_first --out runs/ldm_shapes_canon_first_export
    jaxdiff train --config configs/ldm_shapes_canon.py --workdir runs/ldm_shapes_canon    # 2,000 steps of 2,400
    jaxdiff export --workdir runs/ldm_shapes_canon --out runs/ldm_shapes_canon_export   # models/shapes_sd until attempt 17

(session 18 ran the two canonical stages through docs/shapes_sd/attempt15/train_canon_words.py, whose patched
layouts draw the same scenes as `canonical=1`: checked for the first 400 train examples, with the two exports
named runs/words_2200 and runs/a15_800). Why and what it gave:
docs/shapes_sd.md, attempt 15. In short: the UNet had ignored the relation word with either half alone (the words
back but random layouts: attempt 14, 2,241 steps; canonical layouts on the tower that had erased the words: 850
steps); with both, the relation order came in between steps 800 and 1,600 of the second stage (relation 200 at
w = 3: 28 % at its start, 40.5 % at step 1,248, 65.5 % at step 1,600, named / reversed 131 / 2).
"""

import common
import ldm_shapes_words


def get_config(arg=None):
    c = ldm_shapes_words.get_config()
    if (
        arg == "first"
    ):  # the first, shorter stage: the words run's relation mix at its learning rate
        c.model.model_dir = "runs/ldm_shapes_words_export"
        c.data.source = "shapes_world_memory:40000:relation=0.5,count=0.25,canonical=1"
        c.optim = common.optim(
            learning_rate=1.5e-4,
            warmup_steps=50,
            total_steps=1200,
            final_lr_ratio=0.1,
            ema_decay=0.99,
        )
        c.loop.steps = 800
        return c
    c.model.model_dir = "runs/ldm_shapes_canon_first_export"
    c.data.source = "shapes_world_memory:40000:relation=0.6,count=0.2,canonical=1"
    c.data.seed = 15
    c.optim = common.optim(
        learning_rate=3e-4, warmup_steps=50, total_steps=2400, final_lr_ratio=0.1, ema_decay=0.99
    )
    c.loop.steps = (
        2000  # of the 2,400-step schedule: the run was stopped there for the study (session 18)
    )
    c.loop.checkpoint_every = 400
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__, known=("first",))

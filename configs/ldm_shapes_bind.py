"""The shapes-world Stable Diffusion, attempts 17 and 18: short, gentle stages on top of attempt 15's canonical run
(`configs/ldm_shapes_canon.py`) that train relation and count scenes equally (40 % each, canonical layouts), at a
third of attempt 15's learning rate, on the 2-core CPU; the third stage (`:shared`) makes half of its relation
scenes pairs whose objects share a colour or a shape (`shapes_world_memory:...,shared=0.5`).

As they ran (sessions 19 and 20, 2026-12-07; 1,200 steps each, 29 min each; the first from the model then
committed as models/shapes_sd, which is this chain's runs/ldm_shapes_canon_export):

    jaxdiff train --config configs/ldm_shapes_bind.py --workdir runs/ldm_shapes_bind
    jaxdiff export --workdir runs/ldm_shapes_bind --out runs/ldm_shapes_bind_export
    jaxdiff train --config configs/ldm_shapes_bind.py:second --workdir runs/ldm_shapes_bind2
    jaxdiff export --workdir runs/ldm_shapes_bind2 --out runs/ldm_shapes_bind2_export
    jaxdiff train --config configs/ldm_shapes_bind.py:shared --workdir runs/ldm_shapes_bind3
    jaxdiff export --workdir runs/ldm_shapes_bind3 --out models/shapes_sd

Why and what they gave: docs/shapes_sd.md, attempts 17 and 18. In short: attempt 15 had pushed relations (60 %
of its scenes) and counts had fallen (72 % -> 56 % before the guidance interval); an equal mix at lr 1e-4 lifted
both. Study prompts at w = 2, interval [0, 0.5], validation / held-out: 85.8 / 81.3 % before, 87.6 / 86.3 % after
the first stage, 88.6 / 89.3 % after the second, 91.4 / 89.0 % after the third.
"""

import common
import ldm_shapes_canon


def get_config(arg=None):
    c = ldm_shapes_canon.get_config()
    c.model.model_dir = "runs/ldm_shapes_canon_export"
    c.data.source = "shapes_world_memory:40000:relation=0.4,count=0.4,canonical=1"
    c.data.seed = 17
    c.optim = common.optim(
        learning_rate=1e-4, warmup_steps=50, total_steps=1200, final_lr_ratio=0.1, ema_decay=0.99
    )
    c.loop.steps = 1200
    if (
        arg == "second"
    ):  # attempt 18: the same stage again from the first one's export, a new shuffle
        c.model.model_dir = "runs/ldm_shapes_bind_export"
        c.data.seed = 18
        return c
    if (
        arg == "shared"
    ):  # attempt 18: a third stage, half of its relation scenes pairs that share an attribute
        c.model.model_dir = "runs/ldm_shapes_bind2_export"
        c.data.source = "shapes_world_memory:40000:relation=0.4,count=0.4,canonical=1,shared=0.5"
        c.data.seed = 19
        return c
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__, known=("second", "shared"))

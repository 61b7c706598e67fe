"""The shapes-world Stable Diffusion, attempt 17: a short, gentle stage on top of attempt 15's canonical run
(`configs/ldm_shapes_canon.py`) that trains relation and count scenes equally (40 % each, canonical layouts), at a
third of attempt 15's learning rate, on the 2-core CPU.

As it ran (session 19, 2026-12-07; 1,200 steps in 29 min, from the model then committed as models/shapes_sd,
which is this chain's runs/ldm_shapes_canon_export):

    jaxdiff train --config configs/ldm_shapes_bind.py --workdir runs/ldm_shapes_bind
    jaxdiff export --workdir runs/ldm_shapes_bind --out models/shapes_sd

Why and what it gave: docs/shapes_sd.md, attempt 17. In short: attempt 15 had pushed relations (60 % of its
scenes) and counts had fallen (72 % -> 56 % before the guidance interval); an equal mix at lr 1e-4 lifted both
(study at w = 2, interval [0, 0.5]: validation 85.8 -> 87.6 %, held-out 81.3 -> 86.3 %).
"""
import common
import ldm_shapes_canon


def get_config(arg=None):
    c = ldm_shapes_canon.get_config()
    c.model.model_dir = "runs/ldm_shapes_canon_export"
    c.data.source = "shapes_world_memory:40000:relation=0.4,count=0.4,canonical=1"
    c.data.seed = 17
    c.optim = common.optim(learning_rate=1e-4, warmup_steps=50, total_steps=1200, final_lr_ratio=0.1,
                           ema_decay=0.99)
    c.loop.steps = 1200
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

"""The shapes-world Stable Diffusion's UNet, stage 4: stage 3 (`configs/ldm_shapes_pos.py`, step 3,000) trained
on for 800 steps of a second cosine schedule. Stage 3's fidelity was still climbing fast when its schedule ended
(quick checks at w = 3: 40.0 % at step 2,250, 50.5 % at 3,000).

    jaxdiff export --workdir runs/ldm_shapes_pos --out runs/ldm_shapes_pos_export --overwrite
    jaxdiff train --config configs/ldm_shapes_long.py --workdir runs/ldm_shapes_long
    jaxdiff export --workdir runs/ldm_shapes_long --out runs/ldm_shapes_long_export --overwrite   # stage 5 starts here
    jaxdiff train --config configs/ldm_shapes_long.py:smoke --workdir /tmp/long_smoke

Now that the UNet knows where each pixel is, fewer of the batch go to t >= 850 (30 %, stage 3: 50 %):
counts, relations and shapes are also decided below it. A new shuffle of the training split (seed 7). The committed model's run was planned longer and cut on
resume for this session's CPU (0.2 steps/s): steps 0 to 345 on a 3,000-step cosine, 345 to 391 on a
1,000-step one, then this 800-step one (`optim.total_steps` may change on resume).
"""

import common
import ldm_shapes_pos


def get_config(arg=None):
    c = ldm_shapes_pos.get_config()
    c.model.model_dir = (
        "runs/ldm_shapes_pos_export"  # stage 3 at step 3,000 (= models/shapes_sd before stage 4)
    )
    c.ldm.timestep_bias_portion = 0.3
    c.data.seed = 7
    c.optim = common.optim(
        learning_rate=3e-4, warmup_steps=100, total_steps=800, final_lr_ratio=0.1, ema_decay=0.999
    )
    c.loop.steps = 800
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

"""The shapes-world Stable Diffusion's UNet with a position embedding: stage 2's model (step 5,500) plus a
learned map of each latent pixel's (row, column) added to conv_in's output (`model.unet_position_embedding`,
4 octaves of Fourier features, random at first), trained with half of every
batch at t >= 850.

    jaxdiff train --config configs/ldm_shapes_pos.py --workdir runs/ldm_shapes_pos
    jaxdiff train --config configs/ldm_shapes_pos.py:smoke --workdir /tmp/pos_smoke

Why: at t = T the UNet's input is pure noise, and a convolution learns where it is only from its zero
padding (CoordConv, Liu et al. 2018: convolutions fail to map coordinates to pixels and back without it).
Stages 2 to 4 drew the object wherever the noise put it. The export needs jaxdiff (diffusers' UNet has no
such input).
"""

import common
import ldm_shapes_zsnr


def get_config(arg=None):
    c = ldm_shapes_zsnr.get_config()
    c.model.model_dir = (
        "runs/ldm_shapes_zsnr_export"  # stage 2 at step 5,500 (the model committed before)
    )
    c.model.unet_position_embedding = 4
    c.ldm.timestep_bias_portion = 0.5
    c.ldm.timestep_bias_begin = 850
    c.data.seed = 5
    c.optim = common.optim(
        learning_rate=5e-4, warmup_steps=100, total_steps=3000, final_lr_ratio=0.1, ema_decay=0.999
    )
    c.loop.steps = 3000
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

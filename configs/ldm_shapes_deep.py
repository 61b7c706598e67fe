"""The shapes-world Stable Diffusion's UNet, stage 4: stage 3's model (`configs/ldm_shapes_text.py`) with
its UNet grown by a level at 2 x 2 (`shapes_deep` preset; the old levels keep their weights).

    jaxdiff export --workdir runs/ldm_shapes_text --out runs/ldm_shapes_text_export --overwrite
    jaxdiff train --config configs/ldm_shapes_deep.py --workdir runs/ldm_shapes_deep      # stage 4
    jaxdiff export --workdir runs/ldm_shapes_deep --out models/shapes_sd --overwrite
    jaxdiff train --config configs/ldm_shapes_deep.py:smoke --workdir /tmp/deep_smoke

Why: with a text tower that tells left from right (stage 3), the UNet still drew the object where the
noise put it: the position phrase moved its prediction of the image at t = T by 0.002 (mean absolute
latent difference; the colour word: 0.36). A convolutional UNet has no position embedding; it must read
where it is from its zero padding, which at 16 x 16, 8 x 8 and even 4 x 4 (four interior positions
padded alike by one convolution) is a weak, deep signal. At 2 x 2 every position is a different corner.
"""

import common
import ldm_shapes_text


def get_config(arg=None):
    c = ldm_shapes_text.get_config()
    c.model.model_dir = "runs/ldm_shapes_text_export"  # stage 3's UNet, text tower and VAE
    c.model.text_encoder = ""
    c.model.unet_preset = "shapes_deep"
    c.data.seed = 3
    c.optim = common.optim(
        learning_rate=5e-4, warmup_steps=300, total_steps=1500, final_lr_ratio=0.1, ema_decay=0.999
    )
    c.loop.steps = 1500
    if arg == "smoke":  # stage 1's smoke model: random tiny parts, no growing
        c.model.model_dir = c.model.unet_preset = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

"""The shapes-world Stable Diffusion's UNet, stage 3: stage 2's model (`configs/ldm_shapes_zsnr.py`) with a
new, randomly initialised text tower trained with the UNet, as GLIDE trains its text transformer.

    jaxdiff export --workdir runs/ldm_shapes_zsnr --out runs/ldm_shapes_zsnr_export --overwrite
    jaxdiff train --config configs/ldm_shapes_text.py --workdir runs/ldm_shapes_text      # stage 3
    jaxdiff export --workdir runs/ldm_shapes_text --out models/shapes_sd --overwrite
    jaxdiff train --config configs/ldm_shapes_text.py:smoke --workdir /tmp/text_smoke

Why: the shapes CLIP's text tower (stages 1 and 2 fine-tune it) has no word for left and right. Its
first layer already maps "... in the top left" and "... in the top right" to the same states (cosine
1.000 at the last word and at the end token, 0.73 in the embeddings), because the contrastive loss never
needed the difference; fine-tuning with the UNet did not bring it back, since the UNet never used it.
With the model of stage 2 the position phrase moved the predicted image at t = T by 0.004 (mean
absolute latent difference) where the colour word moved it by 0.32: position stayed at chance, and the
relations "to the left of" / "to the right of" read alike. A fresh tower keeps every word apart.
"""

import common
import ldm_shapes_zsnr


def get_config(arg=None):
    c = ldm_shapes_zsnr.get_config()
    c.model.model_dir = (
        "runs/ldm_shapes_zsnr_export"  # stage 2's UNet and VAE; its text tower is replaced
    )
    c.model.text_encoder = "random"
    c.data.seed = 2
    c.optim = common.optim(
        learning_rate=5e-4, warmup_steps=300, total_steps=5000, final_lr_ratio=0.1, ema_decay=0.999
    )
    c.loop.steps = 1000  # stage 4 grows the UNet from here
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

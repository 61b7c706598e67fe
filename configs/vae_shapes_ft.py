"""The shapes-world KL-VAE, stage 2: fine-tune stage 1 (`configs/vae_shapes.py`) for 4,000 more steps.

    jaxdiff train --config configs/vae_shapes.py --workdir runs/vae_shapes          # stage 1, 2,000 steps
    jaxdiff train --config configs/vae_shapes_ft.py --workdir runs/vae_shapes_ft    # stage 2, from runs/vae_shapes
    jaxdiff export --workdir runs/vae_shapes_ft --out models/shapes_vae
    jaxdiff train --config configs/vae_shapes_ft.py:smoke --workdir /tmp/vae_ft_smoke --config.model.model_dir=RUN

Why: after stage 1 (33.9 dB PSNR) the reconstructions of small stars lost their points and small
squares their corners, so `jaxdiff eval vae` scored only 74 % of them correct against their own
captions, a ceiling on any diffusion model on top; the reconstruction loss was still falling. Stage 2
continues at half the peak learning rate (like Stable Diffusion's ft-MSE VAE, a fine-tune of its
first VAE). `model.model_dir` takes a VAE run, an exported AutoencoderKL folder or a diffusers folder.
"""

import common
import vae_shapes


def get_config(arg=None):
    c = vae_shapes.get_config()
    c.model.model_dir = "runs/vae_shapes"
    c.data.seed = 1  # another shuffle of the training split than stage 1's
    c.vae.logvar_init = 0.0  # the weights come from stage 1
    c.optim.learning_rate = 5e-4
    c.optim.total_steps = c.loop.steps = 4000
    return common.apply_arg(c, arg, __file__)

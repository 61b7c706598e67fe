"""The shapes-world Stable Diffusion's UNet, stage 2: stage 1 (`configs/ldm_shapes.py`) fine-tuned on a
zero-terminal-SNR schedule with v-prediction (Lin et al. 2024), the text tower still training with it.

    jaxdiff train --config configs/ldm_shapes.py --workdir runs/ldm_shapes                # stage 1
    jaxdiff export --workdir runs/ldm_shapes --out runs/ldm_shapes_export --overwrite
    jaxdiff train --config configs/ldm_shapes_zsnr.py --workdir runs/ldm_shapes_zsnr      # stage 2
    jaxdiff export --workdir runs/ldm_shapes_zsnr --out models/shapes_sd
    jaxdiff train --config configs/ldm_shapes_zsnr.py:smoke --workdir /tmp/zsnr_smoke

Why: Stable Diffusion's schedule ends at alpha_bar_T = 0.0047, so at the noisiest training step
sqrt(alpha_bar_T) = 0.068 of the latent is still there. On the shapes world the background fills most
of the image, and a 16 x 16 x 4 latent's mean carries it through that leak; the UNet learned to read
background (and the rough layout) from x_t instead of from the prompt. Sampling starts from pure
noise, so stage 1 drew gray backgrounds for "on a black background" (background 39 % correct at step
3,000, chance 33 %). Rescaling the betas to SNR 0 at t = T - 1 removes the leak; an epsilon target says
nothing at SNR 0, hence v-prediction, plain (unweighted: min-SNR's v weights vanish at SNR 0), and
sampling from t = T - 1 ("trailing" spacing).
"""

import common
import ldm_shapes


def get_config(arg=None):
    c = ldm_shapes.get_config()
    c.model.model_dir = "runs/ldm_shapes_export"  # its UNet, fine-tuned text tower and VAE
    c.model.vae_workdir = c.model.text_encoder = ""
    c.ldm = common.ldm(
        train_text_encoder=True,
        prediction_type="v_prediction",
        min_snr_gamma=0.0,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    c.data.seed = 1  # another shuffle of the training split than stage 1's
    c.optim.total_steps = c.loop.steps = 14000
    if arg == "smoke":  # stage 1's smoke model: random tiny parts
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

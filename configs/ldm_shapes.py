"""The shapes-world Stable Diffusion's UNet, stage 1: 16 x 16 x 4 latents of the shapes VAE, cross-attention
to the text tower of the shapes CLIP (fine-tuned with the UNet), conditioning dropout for classifier-free
guidance; 3,500 steps of a 9,000-step schedule, then stage 2 (`configs/ldm_shapes_zsnr.py`) moves it to
a zero-terminal-SNR schedule.

    jaxdiff train --config configs/ldm_shapes.py --workdir runs/ldm_shapes \\
        [--config.model.vae_workdir=models/shapes_vae] [--config.model.text_encoder=models/shapes_clip]
    jaxdiff export --workdir runs/ldm_shapes --out runs/ldm_shapes_export     # stage 2 starts from it
    jaxdiff train --config configs/ldm_shapes.py:smoke --workdir /tmp/smoke     # tiny, 20 steps, synthetic data

Recipe step 3 (`make shapes-sd`). `model.scaling_factor=0` measures the latent scale
(1 / std of 1,024 training latents) from the frozen VAE; `:smoke` uses random tiny frozen parts.

`ldm.train_text_encoder=True` trains the CLIP's text tower with the UNet (GLIDE trains its text
transformer with the diffusion model): the contrastively trained tower hardly encodes position words
(the last hidden states of "... in the top left" and "... in the bottom right" have cosine 0.93 at the
position tokens; changing the colour gives ~0), and with it frozen the UNet placed 14 % of the objects
in the named cell after 5,500 steps (docs/shapes_sd.md, attempt 2).
"""

import common
import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict(
        dict(
            task="ldm",
            model=dict(
                preset="shapes",
                model_dir="",
                vae_workdir="models/shapes_vae",
                text_encoder="models/shapes_clip",
                scaling_factor=0.0,
            ),
            data=dict(source="shapes_world:data/tfds", resolution=64, global_batch=64, seed=0),
            ldm=common.ldm(train_text_encoder=True),
            optim=common.optim(
                learning_rate=5e-4,
                warmup_steps=300,
                total_steps=9000,
                final_lr_ratio=0.1,
                ema_decay=0.999,
            ),
            loop=common.loop(steps=3500, checkpoint_every=250, sample_every=1000),
            sample_prompts=common.SHAPES_PROMPTS,
            mesh=dict(shape=(-1, 1, 1), rules="data_parallel"),
        )
    )
    if arg == "smoke":
        c.model.vae_workdir = c.model.text_encoder = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

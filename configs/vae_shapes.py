"""The shapes-world KL-VAE: 64 px images <-> 16 x 16 x 4 latents (L2 reconstruction + a small KL weight).

    jaxdiff data build shapes_world --resolution 64 --train 100000 --validation 10000 --heldout 10000 --data-dir data/tfds
    jaxdiff train --config configs/vae_shapes.py --workdir runs/vae_shapes
    jaxdiff train --config configs/vae_shapes.py:smoke --workdir /tmp/vae_smoke     # tiny, 20 steps, synthetic data

Recipe step 2 of the shapes-world Stable Diffusion (`make shapes-sd`); about 25 minutes on
a 2-core CPU. L2 and a narrow initial posterior (`vae.logvar_init`) train much faster here than
L1 from a unit-variance posterior (300 steps on one batch: 32.0 dB against 19.5 dB PSNR).
"""

import common
import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict(
        dict(
            task="vae",
            model=dict(preset="shapes", model_dir=""),
            data=dict(source="shapes_world:data/tfds", resolution=64, global_batch=32, seed=0),
            vae=dict(
                reconstruction="l2",
                kl_weight=1e-6,
                compute_dtype="float32",
                disc_start=-1,
                disc_weight=0.5,
                disc_channels=64,
                disc_layers=3,
                logvar_init=-8.0,
            ),
            optim=common.optim(
                learning_rate=1e-3, warmup_steps=100, total_steps=2000, weight_decay=0.0
            ),
            loop=common.loop(steps=2000, checkpoint_every=250),
            mesh=dict(shape=(-1, 1, 1), rules="data_parallel"),
        )
    )
    return common.apply_arg(c, arg, __file__)

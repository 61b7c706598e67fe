"""The shapes-world KL-VAE: 64 px images <-> 16 x 16 x 4 latents, L2 reconstruction and a small KL weight;
two stages, each a variant written out in full.

    jaxdiff train --config configs/shapes_sd/vae.py:base --workdir runs/vae_base     # 2,000 steps
    jaxdiff train --config configs/shapes_sd/vae.py:ft --workdir runs/vae_ft         # 4,000 more
    jaxdiff export --workdir runs/vae_ft --out runs/vae_ft_export                   # the UNet's VAE
    jaxdiff train --config configs/shapes_sd/vae.py:base,smoke --workdir /tmp/vae_smoke

`base`: L2 and a narrow initial posterior (`vae.logvar_init`) train much faster here than L1 from a
unit-variance posterior. `ft` continues it at half the peak learning rate (as Stable Diffusion's ft-MSE
VAE fine-tunes its first): after `base`, small stars lost their points and small squares their corners.
"""

import common
import ml_collections as mlc

STAGES = {
    "base": dict(model_dir="", seed=0, logvar_init=-8.0, learning_rate=1e-3, steps=2000),
    "ft": dict(model_dir="runs/vae_base", seed=1, logvar_init=0.0, learning_rate=5e-4, steps=4000),
}


def get_config(arg=None):
    stage, smoke = common.parse_stage(arg, STAGES, __file__)
    s = STAGES[stage]
    c = mlc.ConfigDict(
        dict(
            task="vae",
            model=dict(preset="shapes", model_dir=s["model_dir"]),
            data=dict(
                source="shapes_world:data/tfds", resolution=64, global_batch=32, seed=s["seed"]
            ),
            vae=dict(
                reconstruction="l2",
                kl_weight=1e-6,
                compute_dtype="float32",
                disc_start=-1,
                disc_weight=0.5,
                disc_channels=64,
                disc_layers=3,
                logvar_init=s["logvar_init"],
            ),
            optim=common.optim(
                learning_rate=s["learning_rate"],
                warmup_steps=100,
                total_steps=s["steps"],
                weight_decay=0.0,
            ),
            loop=common.loop(steps=s["steps"], checkpoint_every=250),
            mesh=dict(shape=(-1, 1, 1), rules="data_parallel"),
        )
    )
    return common.apply_arg(c, "smoke" if smoke else None, __file__)

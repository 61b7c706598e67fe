"""A tiny latent-diffusion UNet on the shapes world, small enough for a 2-core CPU.

    jaxdiff data build shapes_world --resolution 32 --train 20000 --validation 1000 --heldout 1000 --data-dir data/tfds
    jaxdiff train --config configs/ldm_shapes.py --workdir runs/ldm_shapes [--config.loop.steps=5000]
    jaxdiff train --config configs/ldm_shapes.py:smoke --workdir /tmp/smoke     # 20 steps on synthetic data

The frozen VAE is a VAE run of `configs/vae_shapes.py` given as `--config.model.vae_workdir=runs/vae_shapes`
(its newest checkpoint, EMA if it kept one), else the `tiny` preset with seeded random weights; the
text encoder is the `tiny` preset with seeded random weights (CLIP training is a later issue).
"""
import common
import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict(dict(
        task="ldm",
        model=dict(preset="tiny", model_dir="", vae_workdir=""),
        data=dict(source="shapes_world:data/tfds", resolution=32, global_batch=16, seed=0),
        ldm=common.ldm(),
        optim=common.optim(warmup_steps=200, ema_decay=0.999),
        loop=common.loop(sample_every=500),
        sample_prompts=common.SHAPES_PROMPTS,
        mesh=dict(shape=(-1, 1, 1), rules="data_parallel")))
    return common.apply_arg(c, arg, __file__)

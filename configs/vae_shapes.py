"""The tiny KL-VAE on the shapes world (L1 reconstruction + a small KL weight).

    jaxdiff train --config configs/vae_shapes.py --workdir runs/vae_shapes [--config.loop.steps=5000]
    jaxdiff train --config configs/vae_shapes.py:smoke --workdir /tmp/vae_smoke
"""
import common
import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict(dict(
        task="vae",
        model=dict(preset="tiny", model_dir=""),
        data=dict(source="shapes_world:data/tfds", resolution=32, global_batch=16, seed=0),
        vae=dict(reconstruction="l1", kl_weight=1e-6, compute_dtype="float32", disc_start=-1, disc_weight=0.5,
                 disc_channels=64, disc_layers=3),
        optim=common.optim(weight_decay=0.0),
        loop=common.loop(),
        mesh=dict(shape=(-1, 1, 1), rules="data_parallel")))
    return common.apply_arg(c, arg, __file__)

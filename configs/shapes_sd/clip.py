"""The shapes-world CLIP: a 4-layer ViT (64 px, 8 px patches) and a 4-layer text tower on the shapes
world's own vocabulary, contrastive (InfoNCE); its text tower becomes the UNet's text encoder.

    jaxdiff data build shapes_world --resolution 64 --train 100000 --validation 10000 --heldout 10000 \\
        --data-dir data/tfds
    jaxdiff train --config configs/shapes_sd/clip.py --workdir runs/clip
    jaxdiff export --workdir runs/clip --out models/shapes_clip
    jaxdiff train --config configs/shapes_sd/clip.py:smoke --workdir /tmp/clip_smoke   # 20 tiny steps
"""

import common
import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict(
        dict(
            task="clip",
            model=dict(preset="shapes", tokenizer="shapes", model_dir=""),
            data=dict(source="shapes_world:data/tfds", resolution=64, global_batch=256, seed=0),
            clip=dict(loss="softmax", max_logit_scale=4.6052, compute_dtype="float32"),
            optim=common.optim(
                learning_rate=1e-3,
                warmup_steps=200,
                total_steps=2000,
                final_lr_ratio=0.05,
                weight_decay=0.1,
                ema_decay=0.0,
            ),
            loop=common.loop(steps=2000, checkpoint_every=250),
            mesh=dict(shape=(-1, 1, 1), rules="data_parallel"),
        )
    )
    return common.apply_arg(c, arg, __file__)

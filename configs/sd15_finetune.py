"""Fine-tune a Stable Diffusion 1.x UNet from a diffusers folder (the TPU pod case; see tpu_scripts/).

    jaxdiff train --config configs/sd15_finetune.py --workdir gs://BUCKET/runs/sd15 \\
        --config.model.model_dir=/path/to/stable-diffusion-v1-5 --config.data.source=folder:/data/laion-shards

Params, AdamW moments and the EMA are FSDP-sharded over the mesh's fsdp axis (sd15's 860M fp32 params,
two moments and an EMA are ~14 GB, more than one v5e chip's 16 GB HBM leaves room for), compute is
bf16 with fp32 master params, and the VAE and text encoder stay frozen.
"""

import common
import ml_collections as mlc


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/sd15_finetune.py takes no argument, got {arg!r}")
    return mlc.ConfigDict(
        dict(
            task="ldm",
            model=dict(preset="sd15", model_dir=""),
            data=dict(source="folder:/data/images", resolution=512, global_batch=256, seed=0),
            ldm=common.ldm(compute_dtype="bfloat16", remat=True),
            optim=common.optim(
                learning_rate=1e-5, warmup_steps=500, total_steps=20000, ema_decay=0.9999
            ),
            loop=common.loop(steps=20000, log_every=50, checkpoint_every=1000, max_bad_steps=10),
            mesh=dict(shape=(1, -1, 1), rules="fsdp"),
        )
    )

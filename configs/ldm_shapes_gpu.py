"""The shapes-world Stable Diffusion's UNet, stage 5: stage 4 (`configs/ldm_shapes_long.py`, step 800) trained on
at 4x the batch for as many steps as a few minutes of one GPU allow, on 400,000 training scenes rendered into
memory (`shapes_world_memory:400000`: the train split's first 400,000 examples; the TFDS build has the first
100,000), so that no scene is seen more than a few times.

    jaxdiff export --workdir runs/ldm_shapes_long --out runs/ldm_shapes_long_export --overwrite
    jaxdiff train --config configs/ldm_shapes_gpu.py --workdir runs/ldm_shapes_gpu
    jaxdiff export --workdir runs/ldm_shapes_gpu --out runs/ldm_shapes_gpu_export --overwrite   # models/shapes_sd until attempt 15
    jaxdiff train --config configs/ldm_shapes_gpu.py:smoke --workdir /tmp/gpu_smoke

Sized for one H100/H200 (stages 1 to 4 were sized for the 2-core CPU): on that CPU the same command runs
but takes days (0.06 steps/s at this batch). Rendering the scenes takes ~1 ms of one core each (4.8 GB of
RAM at 64 px; 13 s on the H200 machine's 16 cores).

The committed model's run (2026-12-04, one H200, jax 0.11.2): 2,800 steps (716,800 examples, 1.8 passes
over the 400,000 scenes) at 9.5 to 11 steps/s, 4 min 50 s of training after ~2 min of start-up (render,
load, compile); the speed is the input pipeline's (~2,450 examples/s from grain's 4 decode threads and the
tokenizer), not the GPU's. It started from `models/shapes_sd` as committed then (= stage 4's export,
`--config.model.model_dir=models/shapes_sd`). Since then the rendered scenes are an `ArraySource`, which the
input pipeline batches with one gather per batch instead of grain's per-example work (3x the examples/s on
the 2-core CPU: 5,600 against 1,860 at batch 256); that changes the shuffle, so a rerun sees the same
scenes in another order.
"""

import common
import ldm_shapes_long


def get_config(arg=None):
    c = ldm_shapes_long.get_config()
    c.model.model_dir = "runs/ldm_shapes_long_export"  # stage 4 at step 800
    c.data.source = "shapes_world_memory:400000"
    c.data.global_batch = 256
    c.data.seed = 11
    c.optim = common.optim(
        learning_rate=3e-4, warmup_steps=200, total_steps=2800, final_lr_ratio=0.1, ema_decay=0.999
    )
    c.loop.steps = 2800
    c.loop.log_every = 100
    c.loop.checkpoint_every = 700
    c.loop.sample_every = 0
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

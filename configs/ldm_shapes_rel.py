"""The shapes-world Stable Diffusion's UNet, stage 6: stage 5 (`configs/ldm_shapes_gpu.py`, the committed
`models/shapes_sd` until attempt 15) fine-tuned on a mix with more relation and count scenes, on the 2-core CPU.

    jaxdiff train --config configs/ldm_shapes_rel.py --workdir runs/ldm_shapes_rel
    jaxdiff export --workdir runs/ldm_shapes_rel --out runs/ldm_shapes_rel_export --overwrite
    jaxdiff train --config configs/ldm_shapes_rel.py:smoke --workdir /tmp/rel_smoke

Stage 5 solved one-object scenes (single 94.9 %, background 95.7 % at w = 3) but not relations (32.5 %) or
counts (72.3 %). Measured on 200 relation prompts at w = 3: 28.5 % right, 37 % with both objects drawn in
the wrong order (the named relation holds as often as its opposite: the UNet ignores the relation word) and
34.5 % with one object's colour or shape wrong. So half of every batch is relation scenes and a quarter
count scenes (`shapes_world_memory:N:relation=0.5,count=0.25`: the train split's first scenes of each kind;
one-object and background scenes share the last quarter, so they are not forgotten), at a lower learning
rate than stage 5's peak.

Run (session 11, 2026-12-05, 2 CPU cores, 0.73 steps/s alone): steps 0 to 531 on a 4,000-step cosine, then
cut on resume to this 3,000-step one (`optim.total_steps` may change on resume); 69 min in all. Result
(docs/shapes_sd.md, attempt 9): no measurable gain, so it is not the committed model. Quick check at w = 3
(first 200 validation / 100 held-out captions): 76.5 / 76.0 % (stage 5: 75.0 / 76.0 %); 200 relation prompts:
26 % right at step 1,500 (stage 5: 28.5 %), the relation still holding as often as its opposite.
"""

import common
import ldm_shapes_gpu


def get_config(arg=None):
    c = ldm_shapes_gpu.get_config()
    c.model.model_dir = (
        "runs/ldm_shapes_gpu_export"  # stage 5 at step 2,800 (models/shapes_sd until attempt 15)
    )
    c.data.source = "shapes_world_memory:80000:relation=0.5,count=0.25"
    c.data.global_batch = 64
    c.data.seed = 13
    c.optim = common.optim(
        learning_rate=1.5e-4,
        warmup_steps=100,
        total_steps=3000,
        final_lr_ratio=0.1,
        ema_decay=0.999,
    )
    c.loop.steps = 3000
    c.loop.log_every = 50
    c.loop.checkpoint_every = 250
    c.loop.sample_every = 0
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)

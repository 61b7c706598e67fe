"""The shapes-world Stable Diffusion's UNet: eleven stages, each a variant written out in full.

    jaxdiff train --config configs/shapes_sd/unet.py:STAGE --workdir runs/ldm_STAGE
    jaxdiff export --workdir runs/ldm_STAGE --out runs/ldm_STAGE_export      # the next stage starts there
    jaxdiff train --config configs/shapes_sd/unet.py:STAGE,smoke --workdir /tmp/smoke    # 20 tiny steps

`make shapes-sd` runs them in order (after configs/shapes_sd/clip.py and vae.py); the last stage's export
is models/shapes_sd. Why each stage exists and what it changed: docs/shapes_sd.md. Stage `gpu` is sized
for one GPU (about 5 minutes on an H200); every other stage runs on a 2-core CPU in under two hours.

The runs the shipped model came from differ from these stages in their learning-rate schedules only
(`optim.total_steps` may change on resume): `base` ran its first 1,880 steps on a 5,500-step cosine;
`zsnr` its first 2,687 steps on a 6,000-step one;
`long` ran steps 0 to 345 on a 3,000-step cosine and 345 to 391 on a 1,000-step one; `words` ran 800 and
then 1,500 steps on shorter schedules (800, 1,500) before the 2,500-step one written here.
"""

import common
import ml_collections as mlc

# v-prediction on a zero-terminal-SNR schedule, sampled from t = T - 1 (Lin et al. 2024): every stage
# after the first.
ZSNR = dict(
    prediction_type="v_prediction",
    min_snr_gamma=0.0,
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)
CANONICAL = dict(
    canonical=True
)  # relation scenes in their canonical layout (shapes_world.sample_scene)

# stage: (starts from, data, ldm, optim, loop). Starts from: "" = the shapes CLIP's text tower and the
# shapes VAE (stage 1), else the export of the stage named.
STAGES = {
    # 1. a UNet from scratch; the CLIP text tower trains with it (GLIDE trains its text transformer so)
    "base": dict(
        start="",
        data=dict(source="shapes_world:data/tfds", global_batch=64, seed=0, shapes={}),
        ldm=dict(
            prediction_type="epsilon",
            min_snr_gamma=5.0,
            rescale_betas_zero_snr=False,
            timestep_spacing="leading",
        ),
        optim=dict(learning_rate=5e-4, warmup_steps=300, total_steps=9000, ema_decay=0.999),
        loop=dict(steps=3500, log_every=20, checkpoint_every=250, sample_every=1000),
    ),
    # 2. zero-terminal SNR: the schedule's leak at t = T let the UNet read the background from x_t
    "zsnr": dict(
        start="base",
        data=dict(source="shapes_world:data/tfds", global_batch=64, seed=1, shapes={}),
        ldm=ZSNR,
        optim=dict(learning_rate=5e-4, warmup_steps=300, total_steps=14000, ema_decay=0.999),
        loop=dict(steps=5500, log_every=20, checkpoint_every=250, sample_every=1000),
    ),
    # 3. a learned position embedding (jaxdiff's UNet extension), half of each batch at t >= 850
    "pos": dict(
        start="zsnr",
        data=dict(source="shapes_world:data/tfds", global_batch=64, seed=5, shapes={}),
        ldm=dict(ZSNR, timestep_bias_portion=0.5, timestep_bias_begin=850),
        optim=dict(learning_rate=5e-4, warmup_steps=100, total_steps=3000, ema_decay=0.999),
        loop=dict(steps=3000, log_every=20, checkpoint_every=250, sample_every=1000),
    ),
    # 4. on, with 30 % of each batch at t >= 850
    "long": dict(
        start="pos",
        data=dict(source="shapes_world:data/tfds", global_batch=64, seed=7, shapes={}),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850),
        optim=dict(learning_rate=3e-4, warmup_steps=100, total_steps=800, ema_decay=0.999),
        loop=dict(steps=800, log_every=20, checkpoint_every=250, sample_every=1000),
    ),
    # 5. 4x the batch on 400,000 scenes rendered into memory: sized for one GPU
    "gpu": dict(
        start="long",
        data=dict(source="shapes_world_memory:400000", global_batch=256, seed=11, shapes={}),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850),
        optim=dict(learning_rate=3e-4, warmup_steps=200, total_steps=2800, ema_decay=0.999),
        loop=dict(steps=2800, log_every=100, checkpoint_every=700, sample_every=0),
    ),
    # 6. the token-identity loss brings back the relation words the text tower had erased
    "words": dict(
        start="gpu",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=14,
            shapes=dict(kinds=dict(relation=0.5, count=0.25)),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=1.5e-4, warmup_steps=50, total_steps=2500, ema_decay=0.99),
        loop=dict(steps=2241, log_every=50, checkpoint_every=200, sample_every=0),
    ),
    # 7, 8. relation scenes in their canonical layout
    "canon_first": dict(
        start="words",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=14,
            shapes=dict(kinds=dict(relation=0.5, count=0.25), **CANONICAL),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=1.5e-4, warmup_steps=50, total_steps=1200, ema_decay=0.99),
        loop=dict(steps=800, log_every=50, checkpoint_every=200, sample_every=0),
    ),
    "canon": dict(
        start="canon_first",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=15,
            shapes=dict(kinds=dict(relation=0.6, count=0.2), **CANONICAL),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=3e-4, warmup_steps=50, total_steps=2400, ema_decay=0.99),
        loop=dict(steps=2000, log_every=50, checkpoint_every=400, sample_every=0),
    ),
    # 9-11. relations and counts equally, gently; the last with pairs that share a colour or shape
    "bind": dict(
        start="canon",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=17,
            shapes=dict(kinds=dict(relation=0.4, count=0.4), **CANONICAL),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=1e-4, warmup_steps=50, total_steps=1200, ema_decay=0.99),
        loop=dict(steps=1200, log_every=50, checkpoint_every=400, sample_every=0),
    ),
    "bind2": dict(
        start="bind",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=18,
            shapes=dict(kinds=dict(relation=0.4, count=0.4), **CANONICAL),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=1e-4, warmup_steps=50, total_steps=1200, ema_decay=0.99),
        loop=dict(steps=1200, log_every=50, checkpoint_every=400, sample_every=0),
    ),
    "bind3": dict(
        start="bind2",
        data=dict(
            source="shapes_world_memory:40000",
            global_batch=64,
            seed=19,
            shapes=dict(kinds=dict(relation=0.4, count=0.4), shared=0.5, **CANONICAL),
        ),
        ldm=dict(ZSNR, timestep_bias_portion=0.3, timestep_bias_begin=850, text_token_loss=0.05),
        optim=dict(learning_rate=1e-4, warmup_steps=50, total_steps=1200, ema_decay=0.99),
        loop=dict(steps=1200, log_every=50, checkpoint_every=400, sample_every=0),
    ),
}


def get_config(arg=None):
    stage, smoke = common.parse_stage(arg, STAGES, __file__)
    s = STAGES[stage]
    first = not s["start"]
    c = mlc.ConfigDict(
        dict(
            task="ldm",
            model=dict(
                preset="shapes",
                model_dir="" if first else f"runs/ldm_{s['start']}_export",
                vae_workdir="runs/vae_ft_export" if first else "",
                text_encoder="models/shapes_clip" if first else "",
                scaling_factor=0.0,  # measured on the data (1 / std of the VAE's latents)
                unet_position_embedding=0 if stage in ("base", "zsnr") else 4,
            ),
            data=dict(common.data(**s["data"]), resolution=64),
            ldm=common.ldm(train_text_encoder=True, **s["ldm"]),
            optim=common.optim(final_lr_ratio=0.1, **s["optim"]),
            loop=common.loop(**s["loop"]),
            sample_prompts=common.SHAPES_PROMPTS,
            mesh=dict(shape=(-1, 1, 1), rules="data_parallel"),
        )
    )
    if smoke:  # random tiny frozen parts instead of the models the stage starts from
        c.model.model_dir = c.model.vae_workdir = c.model.text_encoder = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, "smoke" if smoke else None, __file__)

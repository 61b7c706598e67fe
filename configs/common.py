"""Pieces every training config shares (imported by the config files as `common`)."""


def optim(**overrides) -> dict:
    return dict(
        dict(
            learning_rate=1e-3,
            warmup_steps=100,
            total_steps=5000,
            final_lr_ratio=0.1,
            weight_decay=0.01,
            grad_clip=1.0,
            accumulate=1,
            frozen=(),
            ema_decay=0.0,
        ),
        **overrides,
    )


def loop(**overrides) -> dict:
    return dict(
        dict(
            steps=5000,
            seed=0,
            log_every=20,
            checkpoint_every=500,
            keep_checkpoints=3,
            async_checkpoints=True,
            max_bad_steps=5,
            sample_every=0,
        ),
        **overrides,
    )


# Shapes-world prompts for the sample grids (two of them name held-out colour-shape pairs).
SHAPES_PROMPTS = (
    "a red circle",
    "a large blue star in the top left",
    "two green squares",
    "a yellow triangle above a purple cross",
    "an orange circle",
    "a pink diamond on a white background",
    "three cyan crosses",
    "a red star",
)


def ldm(**overrides) -> dict:
    return dict(
        dict(
            prediction_type="epsilon",
            min_snr_gamma=5.0,
            cond_dropout=0.1,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_betas_zero_snr=False,
            timestep_spacing="leading",
            compute_dtype="float32",
            remat=False,
            train_text_encoder=False,
            timestep_bias_portion=0.0,
            timestep_bias_begin=0,
            text_token_loss=0.0,
        ),
        **overrides,
    )


def data(source, global_batch, seed, shapes=None, **overrides) -> dict:
    """A training data section. `shapes` (for `shapes_world_memory:N` sources): `kinds` (fractions of
    scene kinds, the rest shared equally), `canonical` (relation scenes in their canonical layout),
    `shared` (that fraction of relation scenes pairs objects that share a colour or a shape)."""
    shapes = dict(dict(kinds={}, canonical=False, shared=0.0), **(shapes or {}))
    return dict(source=source, global_batch=global_batch, seed=seed, shapes=shapes, **overrides)


def parse_stage(arg, stages, path):
    """`STAGE[,smoke]` (or `smoke`: the first stage's) -> (stage, smoke); an unknown stage names them."""
    parts = [p for p in (arg or "").split(",") if p]
    smoke = "smoke" in parts
    rest = [p for p in parts if p != "smoke"]
    stage = rest[0] if rest else next(iter(stages))
    if len(rest) > 1 or stage not in stages:
        raise ValueError(
            f"{path}: unknown argument {arg!r} (known: {', '.join(stages)}, each optionally with ',smoke')"
        )
    return stage, smoke


def apply_arg(c, arg, path, known=()):
    """`:smoke` shrinks a config to 20 steps on synthetic data; anything else is an error (that names `known`,
    the variants the calling config handled itself)."""
    if arg == "smoke":
        c.data.source, c.data.global_batch = "synthetic:256", 8
        if "shapes" in c.data:  # the options of rendered shapes-world sources
            c.data.shapes = dict(kinds={}, canonical=False, shared=0.0)
        if "preset" in c.model:  # the smallest model at the smallest size
            c.model.preset, c.data.resolution = "tiny", 32
        c.optim.total_steps = c.loop.steps = 20
        c.optim.warmup_steps = 2
        c.loop.log_every, c.loop.checkpoint_every = 5, 10
        if "sample_every" in c.loop:
            c.loop.sample_every = 10
    elif arg:
        raise ValueError(
            f"{path}: unknown argument {arg!r} (known: {', '.join(('smoke', *known))})"
        )
    return c

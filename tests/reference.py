"""PyTorch reference models (diffusers / transformers) built from configs with random weights.

The parity tests, the demo and the benchmarks compare jaxdiff against these; nothing is downloaded.
Needs the ``test`` extra (torch, diffusers, transformers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Small configs in diffusers' own vocabulary: the variants the parity tests cover.
UNET_SD1 = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
UNET_SD2 = dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
    transformer_layers_per_block=(1, 2, 2),
)
UNET_XL = dict(
    sample_size=8,
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=40,
    attention_head_dim=(2, 2, 4),
    use_linear_projection=True,
    norm_num_groups=8,
    transformer_layers_per_block=(1, 1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
)
VAE_SMALL = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
VAE_DEEP = dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=8,
    scaling_factor=0.5,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
TEXT_SD1 = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
    eos_token_id=49407,
)
TEXT_SD2 = dict(
    vocab_size=49408,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    eos_token_id=49407,
    projection_dim=24,
)


def perturb(module, seed: int = 0, std: float = 0.02):
    """Add noise to every parameter: diffusers zero-initialises some layers, which hides wiring bugs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module.eval()


def make_unet(config: dict, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**config), seed)


def make_vae(config: dict, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb(AutoencoderKL(**config), seed)


def make_text_encoder(config: dict, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if config.get("projection_dim") else CLIPTextModel
    return perturb(cls(CLIPTextConfig(**config)), seed)


def make_pipeline_folder(
    folder,
    *,
    unet=UNET_SD1,
    vae=VAE_SMALL,
    text=TEXT_SD1,
    seed: int = 0,
    scheduler: dict | None = None,
):
    """Save a tiny random ``StableDiffusionPipeline`` (real CLIP tokenizer) as a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from jaxdiff.tokenizer import write_clip_tokenizer

    folder = Path(folder)
    tok_dir = write_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    unet_cfg = dict(unet, cross_attention_dim=text["hidden_size"])
    sched = DDIMScheduler(
        **(
            scheduler
            or dict(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            )
        )
    )
    pipe = StableDiffusionPipeline(
        vae=make_vae(vae, seed),
        text_encoder=make_text_encoder(text, seed + 1),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=make_unet(unet_cfg, seed + 2),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)

"""fp32 parity with diffusers / transformers references built from configs with random weights.

Every reference is saved with save_pretrained and read back through the production loader.
Tolerance: max abs error <= 1e-4 x the reference output's max abs value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import torch

from jaxdiff.convert import diffusers as dconv
from jaxdiff.models.text import TextTransformer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL

TOL = 1e-4
# Rarer options: inpainting's 9 input channels, only-cross-attention blocks (the mid block still
# self-attends), no mid block, sin-first time embedding with a frequency shift, no quant convs.
UNET_ODD = dict(
    sample_size=8,
    block_out_channels=(24, 48, 48),
    layers_per_block=3,
    in_channels=9,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=20,
    attention_head_dim=(3, 6, 6),
    norm_num_groups=6,
    only_cross_attention=True,
)
UNET_NO_MID = dict(
    sample_size=8,
    block_out_channels=(32, 32),
    layers_per_block=1,
    mid_block_type=None,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
    flip_sin_to_cos=False,
    freq_shift=1,
)
# DeepFloyd IF's pooled text added to the time embedding (addition_embed_type "text": TextTimeEmbedding)
UNET_TEXT_POOL = dict(ref.UNET_SD1, addition_embed_type="text", addition_embed_type_num_heads=4)
VAE_BARE = dict(
    block_out_channels=(16, 32),
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def assert_close(out, expected, tol=TOL):
    out, expected = np.asarray(out), np.asarray(expected)
    assert out.shape == expected.shape
    scale = np.abs(expected).max()
    err = np.abs(out - expected).max()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


@pytest.mark.parametrize(
    "name,config,hw",
    [
        ("sd1_conv_proj", ref.UNET_SD1, (16, 16)),
        ("sd2_linear_proj_upcast", ref.UNET_SD2, (16, 24)),  # non-square
        ("sdxl_text_time", ref.UNET_XL, (24, 16)),
        ("odd_size_skips", ref.UNET_SD1, (10, 14)),  # upsampling to odd skip shapes
        ("only_cross_9ch", UNET_ODD, (16, 8)),
        ("no_mid_block", UNET_NO_MID, (8, 16)),
        ("text_pooling", UNET_TEXT_POOL, (8, 8)),
    ],
)
def test_unet_matches_diffusers(tmp_path, name, config, hw):
    model = ref.make_unet(config)
    model.save_pretrained(tmp_path)
    cfg, params = dconv.load_component(tmp_path, "unet")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.get("in_channels", 4), *hw, generator=g)
    t = torch.tensor([3.0, 917.0])
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    added, added_t = None, {}
    if config.get("addition_embed_type") == "text_time":
        pooled = torch.randn(2, 24, generator=g)
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 2, 48, 80]])
        added_t = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        added = {"text_embeds": jnp.asarray(pooled.numpy()), "time_ids": jnp.asarray(ids.numpy())}
    with torch.no_grad():
        expected = model(x, t, ctx, **added_t).sample.numpy()
    out = jax.jit(UNet(cfg).apply)({"params": params}, ref.nhwc(x), t.numpy(), ctx.numpy(), added)
    assert_close(ref.nchw(out), expected)


@pytest.mark.parametrize(
    "config,hw", [(ref.VAE_SMALL, (32, 48)), (ref.VAE_DEEP, (40, 32)), (VAE_BARE, (24, 40))]
)
def test_vae_matches_diffusers(tmp_path, config, hw):
    model = ref.make_vae(config)
    model.save_pretrained(tmp_path)
    cfg, params = dconv.load_component(tmp_path, "vae")
    assert cfg.scaling_factor == model.config.scaling_factor
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = model.encode(x).latent_dist
        decoded = model.decode(post.mean).sample.numpy()
    vae = AutoencoderKL(cfg)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, ref.nhwc(x))
    assert_close(ref.nchw(enc.mean), post.mean.numpy())
    assert_close(ref.nchw(enc.logvar), post.logvar.numpy())
    assert_close(enc.kl(), post.kl().numpy())
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, enc.mean)
    assert_close(ref.nchw(dec), decoded)


@pytest.mark.parametrize(
    "config",
    [ref.TEXT_SD1, ref.TEXT_SD2, dict(ref.TEXT_SD1, eos_token_id=2)],
    ids=["sd1_quick_gelu", "sd2_gelu_projection", "legacy_eos_argmax"],
)
def test_text_encoder_matches_transformers(tmp_path, config):
    model = ref.make_text_encoder(config)
    model.save_pretrained(tmp_path)
    cfg, params = dconv.load_component(tmp_path, "text_encoder")
    ids = torch.randint(1, 49406, (3, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 49406
    for row, n in enumerate((5, 30, 76)):  # EOS at different places, EOS padding after it
        ids[row, n:] = 49407
    with torch.no_grad():
        r = model(ids, output_hidden_states=True)
    out = jax.jit(TextTransformer(cfg).apply)({"params": params}, ids.numpy())
    assert_close(out["last_hidden_state"], r.last_hidden_state.numpy())
    assert len(out["hidden_states"]) == len(r.hidden_states) == cfg.num_hidden_layers + 1
    for a, b in zip(out["hidden_states"], r.hidden_states):
        assert_close(a, b.numpy())
    if cfg.projection_dim:
        assert_close(out["text_embeds"], r.text_embeds.numpy())
    else:
        assert_close(out["pooled"], r.pooler_output.numpy())


def test_text_attention_mask_matches_transformers(tmp_path):
    model = ref.make_text_encoder(ref.TEXT_SD1)
    model.save_pretrained(tmp_path)
    cfg, params = dconv.load_component(tmp_path, "text_encoder")
    ids = torch.full((2, 16), 49407)
    ids[:, 0], ids[0, 1:4], ids[1, 1:9] = 49406, torch.tensor([320, 1125, 539]), 320
    mask = (torch.arange(16)[None] < torch.tensor([[5], [10]])).long()
    with torch.no_grad():
        r = model(ids, attention_mask=mask)
    out = TextTransformer(cfg).apply({"params": params}, ids.numpy(), mask.numpy())
    valid = mask.numpy().astype(bool)
    assert_close(np.asarray(out["last_hidden_state"])[valid], r.last_hidden_state.numpy()[valid])
    assert_close(out["pooled"], r.pooler_output.numpy())


def test_bf16_inference_close_to_fp32(tmp_path):
    """bf16 compute and params vs fp32: within 3% of the output scale (bf16 has an 8-bit mantissa)."""
    model = ref.make_unet(ref.UNET_SD1)
    model.save_pretrained(tmp_path)
    cfg, p32 = dconv.load_component(tmp_path, "unet")
    _, p16 = dconv.load_component(tmp_path, "unet", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4), np.float32)
    ctx = rng.standard_normal((2, 7, 32), np.float32)
    t = np.array([10.0, 700.0], np.float32)
    out32 = jax.jit(UNet(cfg).apply)({"params": p32}, x, t, ctx)
    out16 = jax.jit(UNet(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply)(
        {"params": p16}, x, t, ctx
    )
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max()
    scale = np.abs(np.asarray(out32)).max()
    assert err <= 0.03 * scale, (err, scale)
    assert err > 0  # really computed in bf16

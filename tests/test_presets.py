"""The named presets are the real architectures: every param's name and shape equals the PyTorch
reference's, built on torch's meta device (no memory, no weights)."""

import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util

from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert import naming
from jaxdiff.models import text, unet, vae


def _torch_shapes(kind, config):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = dconv.COMPONENTS[kind].config_to(config)
    with torch.device("meta"):
        if kind == "unet":
            m = UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")})
        elif kind == "vae":
            m = AutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")})
        else:
            cls = CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel
            m = cls(CLIPTextConfig(**{k: v for k, v in d.items() if k != "architectures"}))
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize(
    "kind,module,preset",
    [
        ("unet", unet, "sd15"),
        ("unet", unet, "sd21"),
        ("unet", unet, "sdxl"),
        ("unet", unet, "shapes"),
        ("vae", vae, "shapes"),
        ("vae", vae, "sd15"),
        ("text_encoder", text, "sd15"),
        ("text_encoder", text, "sd21"),
        ("text_encoder", text, "sdxl"),
    ],
)
def test_preset_matches_reference_architecture(kind, module, preset):
    config = module.PRESETS[preset]
    flat = traverse_util.flatten_dict(nn.unbox(dconv.abstract_params(kind, config)))
    ours = {
        naming.torch_key(p): naming.to_torch_layout(p, _zeros(v.shape)).shape
        for p, v in flat.items()
    }
    # transformers 5 drops CLIPTextModel's "text_model." prefix in memory; compare without it
    theirs = dconv.COMPONENTS[kind].keys_in(_torch_shapes(kind, config))
    assert ours == theirs


def test_known_parameter_counts():
    count = lambda kind, cfg: sum(
        v.size
        for v in traverse_util.flatten_dict(nn.unbox(dconv.abstract_params(kind, cfg))).values()
    )
    assert count("unet", unet.PRESETS["sd15"]) == 859_520_964
    assert count("unet", unet.PRESETS["sdxl"]) == 2_567_463_684
    assert count("text_encoder", text.PRESETS["sd15"]) == 123_060_480


def test_position_embedding_adds_a_map_of_row_and_column_to_conv_in():
    """UNetConfig.position_embedding: a learned map of Fourier features of (row, column) added to conv_in's
    output. Added to a trained UNet (as model.unet_position_embedding does) every old tensor is kept; the
    map starts random, not zero (it only helps together with the text, which needs a gradient to find it);
    with the map at zero it is the plain UNet; every latent pixel gets its own features; the config survives
    the folder's json, where a plain UNet's config gains no key (diffusers loads it as before)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    plain = unet.PRESETS["tiny"]
    placed = dataclasses.replace(plain, position_embedding=3)
    init = lambda cfg, seed: nn.unbox(
        unet.UNet(cfg).init(  # noqa: E731
            jax.random.key(seed), *dconv.COMPONENTS["unet"].dummy_inputs(cfg)
        )["params"]
    )
    old = init(plain, 0)
    grown, copied, new = unet.grow_params(old, init(placed, 1))
    assert new == 2 and copied == len(traverse_util.flatten_dict(old))  # kernel and bias
    x, t, ctx = (
        jax.random.normal(jax.random.key(2), (2, 8, 8, 4)),
        jnp.array([10, 900]),
        jnp.ones((2, 5, 32)),
    )
    want = unet.UNet(plain).apply({"params": old}, x, t, ctx)
    assert (
        float(jnp.abs(unet.UNet(placed).apply({"params": grown}, x, t, ctx) - want).mean()) > 1e-3
    )
    grown["position_embedding"]["kernel"] = jnp.zeros_like(grown["position_embedding"]["kernel"])
    np.testing.assert_array_equal(unet.UNet(placed).apply({"params": grown}, x, t, ctx), want)
    feats = np.asarray(unet.position_features(8, 8, 3)).reshape(64, 12)
    assert len(np.unique(feats.round(5), axis=0)) == 64 and np.abs(feats).max() <= 1
    d = dconv.unet_config_to_diffusers(placed)
    assert d[dconv.POSITION_KEY] == 3 and dconv.unet_config_from_diffusers(d) == placed
    assert dconv.POSITION_KEY not in dconv.unet_config_to_diffusers(plain)
    with pytest.raises(ValueError, match="position_embedding must be >= 0"):
        dataclasses.replace(plain, position_embedding=-1)
    from jaxdiff.convert import single_file

    with pytest.raises(single_file.ConversionError, match="position embedding"):
        single_file.single_file_state_dict(unet=(placed, grown), vae=None, text_encoder=None)


def _zeros(shape):
    return np.broadcast_to(np.float32(0), shape)  # a zero-stride view: shape without memory

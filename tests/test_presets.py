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
        ("unet", unet, "shapes_deep"),
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


def test_grow_unet_by_a_level():
    """grow_params: the shallow UNet's tensors land where the deeper UNet uses them alike (down blocks
    and mid by name, up blocks shifted by the added level); the new level keeps its init; the grown UNet runs."""
    import jax
    import jax.numpy as jnp

    small, deep = unet.PRESETS["shapes"], unet.PRESETS["shapes_deep"]
    init = lambda cfg, seed: nn.unbox(
        unet.UNet(cfg).init(  # noqa: E731
            jax.random.key(seed), *dconv.COMPONENTS["unet"].dummy_inputs(cfg)
        )["params"]
    )
    old, fresh = init(small, 0), init(deep, 1)
    grown, copied, new = unet.grow_params(old, small, fresh, deep)
    flat_old, flat_new, flat_fresh = (traverse_util.flatten_dict(t) for t in (old, grown, fresh))
    assert copied + new == len(flat_new) and copied == len(
        flat_old
    )  # every old tensor is used once
    np.testing.assert_array_equal(
        flat_new[("up_blocks_1", "resnets_0", "conv1", "kernel")],
        flat_old[("up_blocks_0", "resnets_0", "conv1", "kernel")],
    )
    np.testing.assert_array_equal(
        flat_new[("down_blocks_1", "attentions_0", "proj_in", "kernel")],
        flat_old[("down_blocks_1", "attentions_0", "proj_in", "kernel")],
    )
    for k in (
        ("up_blocks_0", "resnets_0", "conv1", "kernel"),
        ("down_blocks_3", "resnets_0", "conv1", "kernel"),
        ("down_blocks_2", "downsamplers_0", "conv", "kernel"),
    ):
        np.testing.assert_array_equal(flat_new[k], flat_fresh[k])
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 4))
    out = unet.UNet(deep).apply({"params": grown}, x, jnp.array([10]), jnp.zeros((1, 5, 128)))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="does not extend"):
        unet.grow_params(fresh, deep, old, small)


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
    grown, copied, new = unet.grow_params(old, plain, init(placed, 1), placed)
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


def test_context_refiner_lets_every_token_see_the_whole_caption():
    """UNetConfig.context_refiner: bidirectional self-attention layers over the text states, inside the UNet.
    Added to a trained UNet (model.unet_context_refiner) it starts as the identity (zero-initialised residual
    branches): the output is the plain UNet's, bit for bit. Once its output projections move, an early
    token's state depends on later tokens (the causal text tower's first words cannot see the rest). The
    config survives the folder's json; a plain UNet's gains no key; the single-file layout refuses it."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    plain = unet.PRESETS["tiny"]
    refined = dataclasses.replace(plain, context_refiner=2)
    init = lambda cfg, seed: nn.unbox(
        unet.UNet(cfg).init(  # noqa: E731
            jax.random.key(seed), *dconv.COMPONENTS["unet"].dummy_inputs(cfg)
        )["params"]
    )
    old = init(plain, 0)
    grown, copied, new = unet.grow_params(old, plain, init(refined, 1), refined)
    assert copied == len(traverse_util.flatten_dict(old))
    assert new == len(traverse_util.flatten_dict(grown["context_refiner"])) == 2 * 13
    x, t = jax.random.normal(jax.random.key(2), (2, 8, 8, 4)), jnp.array([10, 900])
    ctx = jax.random.normal(jax.random.key(3), (2, 5, 32))
    np.testing.assert_array_equal(
        unet.UNet(refined).apply({"params": grown}, x, t, ctx),
        unet.UNet(plain).apply({"params": old}, x, t, ctx),
    )
    moved = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jax.random.normal(jax.random.key(4), v.shape) * 0.3
            if any(getattr(k, "key", None) in ("to_out_0", "net_2") for k in p)
            else v
        ),
        grown["context_refiner"],
    )
    refine = lambda c: unet.ContextRefiner(2).apply({"params": moved}, c)  # noqa: E731
    later = ctx.at[:, 4].set(
        jax.random.normal(jax.random.key(5), (2, 32))
    )  # change only the last token
    first = lambda c: refine(c)[:, 0]  # noqa: E731
    assert float(jnp.abs(first(later) - first(ctx)).max()) > 1e-2  # the first token saw it
    assert float(jnp.abs(refine(ctx) - ctx).mean()) > 1e-2
    d = dconv.unet_config_to_diffusers(refined)
    assert d[dconv.REFINER_KEY] == 2 and dconv.unet_config_from_diffusers(d) == refined
    assert dconv.REFINER_KEY not in dconv.unet_config_to_diffusers(plain)
    with pytest.raises(ValueError, match="context_refiner must be >= 0"):
        dataclasses.replace(plain, context_refiner=-1)
    with pytest.raises(ValueError, match="not a multiple of the refiner's head width 32"):
        dataclasses.replace(plain, cross_attention_dim=48, context_refiner=1)
    from jaxdiff.convert import single_file

    with pytest.raises(single_file.ConversionError, match="context refiner"):
        single_file.single_file_state_dict(unet=(refined, grown), vae=None, text_encoder=None)

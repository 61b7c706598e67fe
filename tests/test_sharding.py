"""Sharding declared once: every logical name is covered by every rule set; UNet params shard."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff import sharding as sh
from jaxdiff.convert import diffusers as dconv
from jaxdiff.models import text, unet, vae


def _all_names():
    names = set()
    for kind, cfg in (
        ("unet", unet.PRESETS["tiny"]),
        ("unet", unet.PRESETS["sdxl"]),
        ("vae", vae.PRESETS["tiny"]),
        ("text_encoder", text.PRESETS["sdxl"]),
    ):
        names |= sh.logical_names_used(dconv.abstract_params(kind, cfg))
    return names


@pytest.mark.parametrize("rules", sh.RULE_SETS, ids=list(sh.RULE_SETS))
def test_every_logical_name_is_covered(rules):
    used = _all_names() | {sh.BATCH, sh.LENGTH, sh.HEIGHT, sh.WIDTH}  # + activation constraints
    covered = {name for name, _ in sh.RULE_SETS[rules]}
    assert used <= covered, f"{rules} misses {used - covered}"
    assert covered <= set(sh.LOGICAL_NAMES)


def test_unet_params_born_sharded_over_8_devices():
    assert jax.device_count() == 8
    cfg = unet.PRESETS["tiny"]
    model = unet.UNet(cfg)
    inputs = dconv._unet_inputs(cfg)
    init = lambda key: model.init(key, *inputs)["params"]
    abstract = jax.eval_shape(init, jax.random.key(0))
    mesh = sh.make_mesh((1, 8, 1))
    shardings = sh.param_shardings(abstract, mesh, sh.FSDP_RULES)
    params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))
    kernel = params["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]  # [3, 3, 64, 64]
    assert kernel.sharding.shard_shape(kernel.shape) == (3, 3, 8, 64)  # input width split 8 ways
    assert params["conv_in"]["kernel"].sharding.is_fully_replicated  # 4 channels: indivisible
    kernels = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
    split = [x for x in kernels if not x.sharding.is_fully_replicated]
    assert len(split) == len(kernels) - 1  # every weight matrix but conv_in's
    # the sharded forward computes what the single-device one does
    reference = jax.device_put(params, jax.devices()[0])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 4), np.float32)
    ctx = rng.standard_normal((8, 5, 32), np.float32)
    t = np.arange(8, dtype=np.float32) * 100
    want = jax.jit(model.apply)({"params": reference}, x, t, ctx)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_RULES):
        got = jax.jit(model.apply)({"params": params}, jax.device_put(x, batch), t, ctx)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_make_mesh_fills_and_rejects():
    assert dict(sh.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sh.make_mesh((4, 4, 1))
    with pytest.raises(ValueError, match="at most one"):
        sh.make_mesh((-1, -1, 1))

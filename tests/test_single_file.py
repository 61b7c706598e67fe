"""Original single-file SD checkpoints: our export is read by diffusers' own single-file loader, our
import matches the PyTorch models, and the full-size SD 1.5 / 2.1 layouts agree with diffusers' converters."""

import dataclasses
import json
import os
import types

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # (conftest sets it too) nothing here may touch the network

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from jaxdiff.convert import diffusers as dlib
from jaxdiff.convert import single_file as sf
from jaxdiff.convert import tensors
from jaxdiff.convert.naming import ConversionError
from jaxdiff.models import text as text_lib
from jaxdiff.models import unet as unet_lib
from jaxdiff.models import vae as vae_lib

X, D = "CrossAttnDownBlock2D", "DownBlock2D"
XU, U = "CrossAttnUpBlock2D", "UpBlock2D"
VARIANTS = {
    # SD 1.x-like: conv proj_in, last down block without attention (upsampler at output_blocks.N.1)
    "sd1": dict(
        unet=dict(down_block_types=(X, D), up_block_types=(U, XU), layers_per_block=2),
        vae_layers=1,
        text=dict(hidden_act="quick_gelu", num_hidden_layers=2),
    ),
    # SD 2.x-like: linear proj_in, attention everywhere (upsampler at .2), 2 transformer layers, OpenCLIP
    # text with 23 used layers (diffusers' SD 2 loader drops resblocks.23 by name, as for the real ViT-H)
    "sd2": dict(
        unet=dict(
            down_block_types=(X, X),
            up_block_types=(XU, XU),
            layers_per_block=1,
            use_linear_projection=True,
            upcast_attention=True,
            transformer_layers_per_block=(2, 1),
        ),
        vae_layers=2,
        text=dict(hidden_act="gelu", num_hidden_layers=23),
    ),
}


def _tokenizer(folder):
    folder.mkdir()
    (folder / "vocab.json").write_text(
        json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2})
    )
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _build(name, tmp):
    """A tiny random pipeline saved as a diffusers folder, loaded into jaxdiff, exported as a single file."""
    v = VARIANTS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        sample_size=8,
        **v["unet"],
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        layers_per_block=v["vae_layers"],
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            **v["text"],
        )
    )
    for m in (unet, vae, text):  # random, not init, values everywhere (norms included)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=_tokenizer(tmp / "tok"),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "pipe")
    parts = {k: dlib.load_component(tmp / "pipe" / k, k) for k in ("unet", "vae", "text_encoder")}
    sf.save_single_file(tmp / "model.safetensors", **parts)
    return types.SimpleNamespace(
        name=name,
        folder=tmp / "pipe",
        path=tmp / "model.safetensors",
        pipe=pipe,
        parts=parts,
        configs={k: c for k, (c, _) in parts.items()},
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {n: _build(n, tmp_path_factory.mktemp(n)) for n in VARIANTS}


@pytest.fixture(params=sorted(VARIANTS))
def case(request, cases):
    return cases[request.param]


def _state(m):
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def test_diffusers_loads_our_single_file(case):
    """The independent check: diffusers' own LDM converter reads back exactly the original weights."""
    ours = StableDiffusionPipeline.from_single_file(
        str(case.path),
        config=str(case.folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    file_keys = set(tensors.read_tensors(case.path))
    for name in ("unet", "vae", "text_encoder"):
        want, got = _state(getattr(case.pipe, name)), _state(getattr(ours, name))
        assert set(want) == set(got)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    # diffusers loads non-strictly: also check the file holds nothing it skipped (bar the unused last
    # OpenCLIP resblock: 12 tensors, fused q/k/v counted once) and no transformers position_ids buffer.
    n = sum(len(_state(getattr(case.pipe, c))) for c in ("unet", "vae", "text_encoder"))
    n -= sum(k.endswith("position_ids") for k in _state(case.pipe.text_encoder))
    if case.name == "sd2":
        n += 12 - 23 * 4  # the extra block; 6 q/k/v weights+biases become 2 fused tensors per layer
    assert len(file_keys) == n


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-4, f"{what}: relative max error {err:.2e}"


def _run(fn, *args):
    """jit without LLVM optimisation: these tiny graphs compile ~2x faster, which dominates the test."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _check_outputs(pipe, loaded):
    rng = np.random.default_rng(0)
    (uc, up), (vc, vp), (tc, tp) = loaded["unet"], loaded["vae"], loaded["text_encoder"]
    x, ctx = (
        rng.standard_normal((2, 4, 8, 8), np.float32),
        rng.standard_normal((2, 5, 32), np.float32),
    )
    img = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    ids = np.array([[0, 7, 99, 512, 1, 2, 2]], np.int32)
    with torch.no_grad():
        t_eps = pipe.unet(torch.from_numpy(x), 321, torch.from_numpy(ctx)).sample.numpy()
        t_post = pipe.vae.encode(torch.from_numpy(img)).latent_dist.mean
        t_img = pipe.vae.decode(t_post).sample.numpy()
        t_txt = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    nhwc, nchw = (
        (lambda a: np.asarray(a).transpose(0, 2, 3, 1)),
        (lambda a: np.asarray(a).transpose(0, 3, 1, 2)),
    )
    eps = _run(
        lambda p, *a: unet_lib.UNet(uc).apply({"params": p}, *a),
        up,
        nhwc(x),
        np.full(2, 321.0),
        ctx,
    )
    _close(nchw(eps), t_eps, "unet")
    vae = vae_lib.AutoencoderKL(vc)
    mean, dec = _run(
        lambda p, i, z: (
            vae.apply({"params": p}, i, method="encode").mean,
            vae.apply({"params": p}, z, method="decode"),
        ),
        vp,
        nhwc(img),
        nhwc(t_post),
    )
    _close(nchw(mean), t_post.numpy(), "vae encode")
    _close(nchw(dec), t_img, "vae decode")
    txt = _run(
        lambda p, i: text_lib.TextTransformer(tc).apply({"params": p}, i)["last_hidden_state"],
        tp,
        ids,
    )
    _close(txt, t_txt, "text encoder")


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_single_file_matches_torch(case):
    loaded = sf.load_single_file(
        case.path,
        unet_config=case.configs["unet"],
        vae_config=case.configs["vae"],
        text_config=case.configs["text_encoder"],
    )
    for k, (cfg, params) in case.parts.items():
        assert loaded[k][0] == cfg
        _assert_same_params(loaded[k][1], params)
    _check_outputs(case.pipe, loaded)


def test_infer_configs_from_tiny_file(case):
    unet, vae, text = sf.infer_configs(tensors.read_tensors(case.path))
    for got, want, fields in (
        (
            unet,
            case.configs["unet"],
            (
                "in_channels",
                "out_channels",
                "block_out_channels",
                "down_block_types",
                "up_block_types",
                "layers_per_block",
                "transformer_layers_per_block",
                "cross_attention_dim",
                "use_linear_projection",
                "mid_block",
            ),
        ),
        (
            vae,
            case.configs["vae"],
            (
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "use_quant_conv",
                "use_post_quant_conv",
                "mid_block_add_attention",
            ),
        ),
        (
            text,
            case.configs["text_encoder"],
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "max_position_embeddings",
                "hidden_act",
            ),
        ),
    ):
        assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    if case.name == "sd1":  # (sd2: test_openclip_layout_built_by_hand loads with inferred configs)
        loaded = sf.load_single_file(
            case.path
        )  # heads / groups are the SD defaults; the params still fit
        _assert_same_params(loaded["unet"][1], case.parts["unet"][1])


def _openclip_by_hand(text: CLIPTextModel, rng) -> dict:
    """What open_clip's state dict looks like for a transformers CLIP text tower, built independently."""
    s = {k.removeprefix("text_model."): v for k, v in _state(text).items()}
    p, n, h = sf.OPENCLIP, text.config.num_hidden_layers, text.config.hidden_size
    out = {
        p + "token_embedding.weight": s["embeddings.token_embedding.weight"],
        p + "positional_embedding": s["embeddings.position_embedding.weight"],
        p + "ln_final.weight": s["final_layer_norm.weight"],
        p + "ln_final.bias": s["final_layer_norm.bias"],
        p + "text_projection": rng.standard_normal((h, h), np.float32),
        p + "logit_scale": np.float32(4.6),
    }
    for i in range(
        n + 1
    ):  # resblock n: the last OpenCLIP block, unused by SD 2 (random weights here)
        src = {
            k: (v if i < n else rng.standard_normal(v.shape).astype(np.float32))
            for k, v in s.items()
            if k.startswith("encoder.layers.0." if i == n else f"encoder.layers.{i}.")
        }
        src = {k.split(".", 3)[3]: v for k, v in src.items()}
        r = f"{p}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[r + f"attn.in_proj_{w}"] = np.concatenate(
                [src[f"self_attn.{q}_proj.{w}"] for q in "qkv"]
            )
            out |= {
                r + new + "." + w: src[old + "." + w]
                for old, new in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                )
            }
    return out


def _with_text(case, text_sd):
    sd = {
        k: v
        for k, v in tensors.read_tensors(case.path).items()
        if not k.startswith("cond_stage_model.")
    }
    return sd | text_sd


def test_openclip_layout_built_by_hand(cases):
    case = cases["sd2"]
    sd = _with_text(case, _openclip_by_hand(case.pipe.text_encoder, np.random.default_rng(1)))
    sd |= {
        "model_ema.decay": np.float32(0.999),
        "alphas_cumprod": np.ones(1000, np.float32),
        "sqrt_one_minus_alphas_cumprod": np.ones(1000, np.float32),
    }  # training leftovers, ignored
    loaded = sf.params_from_single_file(sd)  # all inferred: OpenCLIP keys mean SD 2
    assert (
        loaded["text_encoder"][0].num_hidden_layers == 23
        and loaded["text_encoder"][0].hidden_act == "gelu"
    )
    _assert_same_params(loaded["text_encoder"][1], case.parts["text_encoder"][1])


def test_bad_inputs_name_the_keys(cases):
    case = cases["sd1"]
    kw = {
        f"{k}_config" if k != "text_encoder" else "text_config": c for k, c in case.configs.items()
    }
    sd = dict(tensors.read_tensors(case.path))
    with pytest.raises(
        ConversionError, match=r"match no param: model\.diffusion_model\.foo\.weight, stray"
    ):
        sf.params_from_single_file(
            sd | {"model.diffusion_model.foo.weight": np.zeros(1), "stray": np.zeros(1)}, **kw
        )
    with pytest.raises(
        ConversionError,
        match=r"no tensor in the checkpoint: first_stage_model\.decoder\.up\.1\."
        r"upsample\.conv\.bias",
    ):
        sf.params_from_single_file(
            {k: v for k, v in sd.items() if not k.endswith("up.1.upsample.conv.bias")}, **kw
        )
    with pytest.raises(ConversionError, match="no text encoder"):
        sf.params_from_single_file(
            {k: v for k, v in sd.items() if not k.startswith("cond_stage_model")}
        )
    sd2 = dict(tensors.read_tensors(cases["sd2"].path))
    with pytest.raises(
        ConversionError, match="22 layers, not 23"
    ):  # the unused last block is required
        sf.params_from_single_file(
            {k: v for k, v in sd2.items() if ".resblocks.23." not in k},
            text_config=cases["sd2"].configs["text_encoder"],
        )
    with pytest.raises(
        ConversionError, match="has 25 OpenCLIP resblocks"
    ):  # two spare blocks: not ignored
        sf.params_from_single_file(
            sd2 | {sf.OPENCLIP + "transformer.resblocks.24.ln_1.bias": np.zeros(32)},
            text_config=cases["sd2"].configs["text_encoder"],
        )


def test_pooled_text_unet_is_refused():
    # DeepFloyd IF's pooled text (addition_embed_type "text") has no place in the LDM layout: refused, not dropped
    pooled = dataclasses.replace(
        unet_lib.PRESETS["tiny"], addition_embed_type="text", addition_embed_type_num_heads=4
    )
    with pytest.raises(ConversionError, match="pooled text"):
        sf.single_file_state_dict(unet=(pooled, {}), vae=None, text_encoder=None)


def test_pickled_ckpt(cases, tmp_path):
    """A .ckpt (torch pickle, read with weights_only=True) with Lightning's state_dict wrapper."""
    case = cases["sd1"]
    sd = {k: torch.from_numpy(np.array(v)) for k, v in tensors.read_tensors(case.path).items()}
    torch.save(
        {"state_dict": sd | {"betas": torch.ones(1000)}, "global_step": 840000}, tmp_path / "m.ckpt"
    )
    loaded = sf.load_single_file(
        tmp_path / "m.ckpt",
        unet_config=case.configs["unet"],
        vae_config=case.configs["vae"],
        text_config=case.configs["text_encoder"],
    )
    for k, (_, params) in case.parts.items():
        _assert_same_params(loaded[k][1], params)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def full_size(request):
    """Full-size SD 1.5 / 2.1 models on the meta device: real names and shapes, no memory."""
    name = request.param
    ucfg, vcfg, tcfg = unet_lib.PRESETS[name], vae_lib.PRESETS[name], text_lib.PRESETS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dlib.unet_config_to_diffusers(ucfg))
        vae = AutoencoderKL.from_config(dlib.vae_config_to_diffusers(vcfg))
        text = CLIPTextModel(
            CLIPTextConfig(
                **{
                    k: v
                    for k, v in dlib.text_config_to_transformers(tcfg).items()
                    if k not in ("architectures", "model_type", "torch_dtype")
                }
            )
        )
    return types.SimpleNamespace(
        name=name, configs=(ucfg, vcfg, tcfg), unet=unet, vae=vae, text=text
    )


def test_full_size_layout_matches_diffusers_converter(full_size):
    ucfg, vcfg, tcfg = full_size.configs
    usd, vsd = full_size.unet.state_dict(), full_size.vae.state_dict()
    utab, vtab = sf.key_table("unet", ucfg), sf.key_table("vae", vcfg)
    assert set(utab) == set(usd) and set(vtab) == set(vsd)
    ldm_u = {utab[k]: v for k, v in usd.items()}
    back = dsf.convert_ldm_unet_checkpoint(ldm_u, dlib.unet_config_to_diffusers(ucfg))
    assert set(back) == set(usd) and all(
        back[k] is usd[k] for k in usd
    )  # the very same tensor per key
    ldm_v = {vtab[k]: sf._to_ldm_value("vae", k, v) for k, v in vsd.items()}
    assert ldm_v[sf.VAE + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = dsf.convert_ldm_vae_checkpoint(ldm_v, dlib.vae_config_to_diffusers(vcfg))
    assert set(back) == set(vsd)
    assert all(
        back[k] is vsd[k] or (".attentions." in k and back[k].shape == vsd[k].shape) for k in vsd
    )
    # The text part, as the real files hold it; then config inference must give the preset back.
    tsd = {k.removeprefix("text_model."): v for k, v in full_size.text.state_dict().items()}
    if tcfg.hidden_act == "gelu":
        h, p = tcfg.hidden_size, sf.OPENCLIP
        text = {
            p + "token_embedding.weight": tsd["embeddings.token_embedding.weight"],
            p + "positional_embedding": tsd["embeddings.position_embedding.weight"],
        }
        for i in range(tcfg.num_hidden_layers + 1):
            text[f"{p}transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(
                (4 * h, h), device="meta"
            )
    else:
        text = {sf.CLIP + k: v for k, v in tsd.items()}
    unet, vae, txt = sf.infer_configs(ldm_u | ldm_v | text)
    assert unet == ucfg and vae == vcfg
    assert txt == tcfg

"""fp32 parity of jaxdiff's CLIP with transformers' ``CLIPModel``, through the folder converter.

References are built from configs with random (perturbed) weights, written with ``save_pretrained``
and read back with ``load_clip``; exports go the other way through ``save_clip`` and
``CLIPModel.from_pretrained``. Nothing is downloaded. Tolerance: max abs error <= 1e-4 x the
reference's max abs value (as tests/test_parity.py).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import torch
from flax import traverse_util
from skimage import data as photos
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor
from transformers import CLIPConfig as HFConfig

from jaxdiff.convert import clip as cconv
from jaxdiff.convert import diffusers as dconv
from jaxdiff.convert import naming, tensors
from jaxdiff.convert.diffusers import ModelFolderError
from jaxdiff.models import clip
from jaxdiff.models.text import TextTransformer

TOL = 1e-4
# transformers' own vocabulary. TINY is jaxdiff's tiny preset.
TINY = dict(
    text_config=dict(
        vocab_size=1000,
        max_position_embeddings=16,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=999,
        bos_token_id=998,
        pad_token_id=999,
    ),
    vision_config=dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    projection_dim=16,
    logit_scale_init_value=math.log(1 / 0.07),
)
# exact gelu, other eps, 7-pixel patches on 28-pixel images, 8 heads, pad id 0 distinct from EOS
ODD = dict(
    text_config=dict(
        vocab_size=500,
        max_position_embeddings=20,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=8,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        eos_token_id=499,
        bos_token_id=498,
        pad_token_id=0,
    ),
    vision_config=dict(
        image_size=28,
        patch_size=7,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=8,
        hidden_act="gelu",
        layer_norm_eps=3e-6,
    ),
    projection_dim=24,
    logit_scale_init_value=1.5,
)
# pre-2023 configs: eos_token_id 2 means "pool at the largest id" (OpenAI's EOS is the last token)
LEGACY = dict(
    text_config=dict(
        vocab_size=400,
        max_position_embeddings=16,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=2,
        bos_token_id=398,
    ),
    vision_config=dict(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
    ),
    projection_dim=16,
)
CONFIGS = {"tiny": TINY, "odd": ODD, "legacy_eos": LEGACY}


def assert_close(out, expected, tol=TOL):
    out, expected = np.asarray(out), np.asarray(expected)
    assert out.shape == expected.shape, (out.shape, expected.shape)
    scale = np.abs(expected).max()
    err = np.abs(out - expected).max()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def init_params(cfg, seed: int = 0):
    # jitted: op-by-op init of even the tiny CLIP takes seconds
    return jax.jit(clip.init_params, static_argnums=0)(cfg, jax.random.key(seed))


def make_clip(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return ref.perturb(CLIPModel(HFConfig(**config)), seed)


def tiny_params(seed: int = 0):
    """The tiny preset's params, from a random transformers model (nothing to compile)."""
    sd = {k: v.numpy() for k, v in make_clip(TINY, seed).state_dict().items()}
    return cconv.params_from_state_dict(clip.PRESETS["tiny"], sd)


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(request, tmp_path_factory):
    """(name, transformers model, its folder, jaxdiff config, params) per config."""
    model = make_clip(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return (request.param, model, folder, *cconv.load_clip(folder))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from jaxdiff.tokenizer import default_bpe_path, write_clip_tokenizer

    try:
        default_bpe_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def token_batch(text: dict, seed: int = 3):
    """[3, T] ids: BOS, random tokens, EOS at three places, then padding; and the matching mask."""
    t = text["max_position_embeddings"]
    bos, eos = text["bos_token_id"], text["eos_token_id"]
    if eos == 2:  # legacy: the real EOS is the largest id
        eos = text["vocab_size"] - 1
    pad = text.get("pad_token_id", 1)
    ids = torch.randint(3, min(bos, eos), (3, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = bos
    ends = (3, t // 2, t - 1)
    for row, n in enumerate(ends):
        ids[row, n], ids[row, n + 1 :] = eos, pad
    mask = (torch.arange(t)[None] <= torch.tensor(ends)[:, None]).long()
    return ids, mask


def jax_outputs(config, params, ids, pixels, mask):
    model = clip.CLIP(config)

    def run(p, ids, px, mask):
        v = {"params": p}
        out = model.apply(v, ids, px, mask)
        out["vision"] = model.apply(v, px, method=lambda m, x: m.vision_model(x))
        out["text"] = model.apply(v, ids, mask, method=lambda m, i, a: m.text_model(i, a))
        out["image_features"] = model.apply(v, px, method=clip.CLIP.image_features)
        out["text_features"] = model.apply(v, ids, mask, method=clip.CLIP.text_features)
        return out

    return jax.jit(run)(params, ids, pixels, mask)


def features(out):
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projection; 4.x a tensor
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_clip_matches_transformers(loaded, with_mask):
    name, model, _, cfg, params = loaded
    if name == "tiny":
        assert cfg == clip.PRESETS["tiny"]
    hf_cfg = CONFIGS[name]
    ids, mask = token_batch(hf_cfg["text_config"])
    s = hf_cfg["vision_config"]["image_size"]
    pixels = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(4))
    mask_t = mask if with_mask else None
    with torch.no_grad():
        r = model(input_ids=ids, pixel_values=pixels, attention_mask=mask_t)
        vis = model.vision_model(pixel_values=pixels)
        img_f = features(model.get_image_features(pixel_values=pixels))
        txt_f = features(model.get_text_features(input_ids=ids, attention_mask=mask_t))
    if with_mask:  # the mask must matter for what is compared: padded positions' hidden states
        with torch.no_grad():
            unmasked = model.text_model(input_ids=ids).last_hidden_state
        assert not torch.allclose(unmasked, r.text_model_output.last_hidden_state)
    out = jax_outputs(
        cfg, params, ids.numpy(), ref.nhwc(pixels), mask.numpy() if with_mask else None
    )
    assert_close(out["image_embeds"], r.image_embeds.numpy())
    assert_close(out["text_embeds"], r.text_embeds.numpy())
    assert_close(out["logits_per_image"], r.logits_per_image.numpy())
    assert_close(np.asarray(out["logits_per_image"]).T, r.logits_per_text.numpy())
    assert_close(out["logit_scale"], model.logit_scale.detach().numpy())
    assert_close(out["vision"]["pooled"], vis.pooler_output.numpy())
    assert_close(out["vision"]["last_hidden_state"], vis.last_hidden_state.numpy())
    assert_close(out["text"]["last_hidden_state"], r.text_model_output.last_hidden_state.numpy())
    assert_close(out["image_features"], img_f.numpy())
    assert_close(out["text_features"], txt_f.numpy())


def test_text_encoder_matches_clip_text_model(loaded, tmp_path):
    """clip.text_encoder's tower equals transformers' CLIPTextModel, read through the SD text-encoder path."""
    name, model, _, cfg, params = loaded
    model.text_model.save_pretrained(tmp_path)  # a CLIPTextModel folder, as in SD's text_encoder/
    text_cfg, text_params = clip.text_encoder(cfg, params)
    cfg2, params2 = dconv.load_component(tmp_path, "text_encoder")
    assert cfg2 == text_cfg
    jax.tree.map(np.testing.assert_array_equal, params2, text_params)
    ids, _ = token_batch(CONFIGS[name]["text_config"], seed=5)
    with torch.no_grad():
        r = model.text_model(input_ids=ids)
    out = jax.jit(TextTransformer(text_cfg).apply)({"params": text_params}, ids.numpy())
    assert_close(out["last_hidden_state"], r.last_hidden_state.numpy())
    assert_close(out["pooled"], r.pooler_output.numpy())
    with pytest.raises(ModelFolderError, match="CLIPTextModel.*load_component"):
        cconv.load_clip(tmp_path)


@pytest.mark.parametrize("image_size", [224, 28])
@pytest.mark.parametrize("photo", ["chelsea", "chelsea_portrait", "astronaut"])
def test_preprocess_matches_clip_image_processor(tmp_path, photo, image_size):
    """Exact up to fp32 rounding: transformers' PIL backend resizes with the same PIL bicubic filter to
    the same (floored) size and crops the same pixels, so the uint8 crops are identical (measured max
    error 2.4e-7 after normalisation, 2e-5 of a 1/255 level); 1e-5 leaves room for rounding only. The
    torchvision backend (not installed here) resizes differently and is not what this compares."""
    img = {
        "chelsea": photos.chelsea(),
        "chelsea_portrait": photos.chelsea().transpose(1, 0, 2).copy(),
        "astronaut": photos.astronaut(),
    }[photo]
    cfg = dataclasses.replace(
        clip.PRESETS["tiny"],
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
        vision=clip.VisionConfig(image_size=image_size, patch_size=image_size // 4),
    )
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(cconv.preprocessor_config_to_transformers(cfg))
    )
    proc = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    expected = proc(images=img, return_tensors="np")["pixel_values"]
    assert_close(clip.preprocess(img[None], cfg), ref.nhwc(expected), tol=1e-5)


def test_export_round_trip(tmp_path, tokenizer_dir):
    """save_clip -> CLIPModel / CLIPProcessor.from_pretrained: same state dict, same logits end to end."""
    cfg = dataclasses.replace(
        clip.PRESETS["tiny"],
        text=clip.TextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=49407,
        ),
        image_mean=(0.5, 0.45, 0.4),
        image_std=(0.25, 0.26, 0.27),
        logit_scale_init=3.0,
    )
    params = init_params(cfg)
    leaves, tree = jax.tree.flatten(params)  # noise everywhere: init leaves biases 0 and norms 1
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten(
        [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    folder = cconv.save_clip(tmp_path / "clip", cfg, params, tokenizer_folder=tokenizer_dir)

    model = CLIPModel.from_pretrained(folder).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = {
        naming.torch_key(k): naming.to_torch_layout(k, np.asarray(v))
        for k, v in traverse_util.flatten_dict(params).items()
    }
    assert sorted(sd) == sorted(ours)
    for k in sd:  # strict: shapes too (logit_scale is 0-d)
        np.testing.assert_array_equal(sd[k], ours[k], err_msg=k, strict=True)
    cfg2, params2 = cconv.load_clip(folder)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    _, p16 = cconv.load_clip(folder, dtype=jnp.bfloat16)
    assert p16["visual_projection"]["kernel"].dtype == jnp.bfloat16
    assert p16["logit_scale"].dtype == jnp.float32  # exp(scale) in bf16 would be 1% off

    from jaxdiff.tokenizer import Tokenizer

    prompts = ["a photo of a cat", "an astronaut in a white suit, holding a helmet", "dog"]
    images = [photos.chelsea(), photos.astronaut()]
    proc = CLIPProcessor.from_pretrained(
        folder, backend="pil"
    )  # the resize preprocess matches exactly
    inputs = proc(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        r = model(**inputs)
    # jaxdiff pads to 77 with EOS and no mask, transformers to the longest prompt with a mask: the
    # pooled EOS state sees neither padding (causal attention), so the logits agree
    ids = Tokenizer(folder)(prompts)
    pixels = jnp.concatenate([clip.preprocess(im[None], cfg) for im in images])  # sizes differ
    np.testing.assert_array_equal(
        ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].numpy()
    )
    out = jax.jit(clip.CLIP(cfg).apply)({"params": params}, ids, pixels)
    assert_close(out["logits_per_image"], r.logits_per_image.numpy())


def test_sharded_and_bin_checkpoints(tmp_path):
    model = make_clip(TINY, seed=1)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    cfg, params = cconv.load_clip(tmp_path / "st")
    for kind in ("sharded", "bin"):
        cfg2, params2 = cconv.load_clip(tmp_path / kind)
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.pop("vision_model.post_layernorm.bias"),
            r"no tensor.*vision_model\.post_layernorm\.bias",
        ),
        (lambda sd: sd.update(logit_bias=np.zeros((), np.float32)), r"match no param: logit_bias"),
        (
            lambda sd: sd.update({"visual_projection.weight": np.zeros((16, 31), np.float32)}),
            r"visual_projection\.weight: checkpoint \(16, 31\).*expects \(32, 16\)",
        ),
    ],
)
def test_checkpoint_mismatch_names_the_key(tmp_path, edit, match):
    make_clip(TINY).save_pretrained(tmp_path)
    sd = dict(tensors.read_safetensors(tmp_path / "model.safetensors"))
    edit(sd)
    tensors.write_safetensors(tmp_path / "model.safetensors", sd)
    with pytest.raises(naming.ConversionError, match=match):
        cconv.load_clip(tmp_path)


def _folder(tmp_path, config=None, files=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_bad_folders_are_refused(tmp_path):
    good = HFConfig(**TINY).to_dict()
    siglip = {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {},
        "vision_config": {},
    }
    cases = [
        (tmp_path / "nowhere", r"no such folder"),
        (_folder(tmp_path / "empty"), r"no config\.json"),
        (
            _folder(tmp_path / "pipe", files={"model_index.json": "{}"}),
            r"diffusers pipeline.*text_encoder",
        ),
        (_folder(tmp_path / "json", files={"config.json": "{not json"}), r"not valid JSON"),
        (_folder(tmp_path / "noweights", good), r"no weights found"),
        (
            _folder(tmp_path / "siglip", siglip),
            r"SigLIP.*not a transformers CLIPModel.*CLIPModel folder",
        ),
        (
            _folder(
                tmp_path / "crop",
                good,
                {
                    "preprocessor_config.json": json.dumps(
                        {"crop_size": {"height": 224, "width": 224}}
                    )
                },
            ),
            r"crops images to 224x224.*takes 32x32",
        ),
        (
            _folder(
                tmp_path / "act",
                dict(good, text_config=dict(TINY["text_config"], hidden_act="gelu_new")),
            ),
            r"text_config is not supported.*hidden_act",
        ),
        (
            _folder(
                tmp_path / "rect",
                dict(good, vision_config=dict(TINY["vision_config"], image_size=[32, 48])),
            ),
            r"image_size \[32, 48\] is not square",
        ),
        (
            _folder(
                tmp_path / "vit",
                {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"},
            ),
            r"vision tower alone",
        ),
    ]
    for folder, match in cases:
        with pytest.raises(ModelFolderError, match=match):
            cconv.load_clip(folder)


def test_config_parse_agrees_with_transformers():
    """Missing keys take transformers' defaults; legacy *_config_dict keys win as they do there."""
    cases = [
        {"architectures": ["CLIPModel"], "model_type": "clip"},
        {
            "model_type": "clip",
            "projection_dim": 8,
            "logit_scale_init_value": 1.0,
            "text_config": {
                "hidden_size": 64,
                "num_attention_heads": 2,
                "hidden_act": "gelu",
                "eos_token_id": 2,
            },
            "vision_config": {"image_size": 64, "patch_size": 16, "num_channels": 1},
        },
        {
            "architectures": ["CLIPModel"],
            "text_config": {"hidden_size": 64, "eos_token_id": 2},
            "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4},
            "vision_config_dict": {"image_size": 48, "patch_size": 16},
        },
    ]
    for d in cases:
        ours, theirs = cconv.clip_config_from_transformers(d), HFConfig.from_dict(dict(d))
        for k in cconv.TEXT_DEFAULTS:
            assert getattr(ours.text, k) == getattr(theirs.text_config, k), k
        for k in cconv.VISION_DEFAULTS:
            assert getattr(ours.vision, k) == getattr(theirs.vision_config, k), k
        assert (ours.projection_dim, ours.logit_scale_init) == (
            theirs.projection_dim,
            theirs.logit_scale_init_value,
        )
    square = dict(
        TINY, vision_config=dict(TINY["vision_config"], image_size=[32, 32], patch_size=(8, 8))
    )
    assert cconv.clip_config_from_transformers(square) == cconv.clip_config_from_transformers(TINY)
    # preprocessor_config.json: mean and std read; older int sizes; what preprocess cannot mirror warns
    pre = {"size": 32, "crop_size": 32, "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3]}
    c = cconv.clip_config_from_transformers(TINY, pre)
    assert (c.image_mean, c.image_std) == ((0.5, 0.5, 0.5), (0.1, 0.2, 0.3))
    with pytest.warns(
        UserWarning, match=r"resizes to \{'shortest_edge': 40\}.*resamples with PIL filter 2"
    ):
        c = cconv.clip_config_from_transformers(
            TINY,
            {
                "size": {"shortest_edge": 40},
                "resample": 2,
                "crop_size": {"height": 32, "width": 32},
                "do_normalize": False,
            },
        )
    assert (c.image_mean, c.image_std) == ((0.0,) * 3, (1.0,) * 3)
    for name in ("tiny", "b16", "l14"):
        c = dataclasses.replace(
            clip.PRESETS[name], image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
        )
        d = json.loads(json.dumps(cconv.clip_config_to_transformers(c)))
        assert (
            cconv.clip_config_from_transformers(d, cconv.preprocessor_config_to_transformers(c))
            == c
        )


def test_logit_bias_export(tmp_path):
    cfg = dataclasses.replace(clip.PRESETS["tiny"], logit_bias_init=-10.0)
    params = dict(tiny_params(), logit_bias=np.float32(-10.0))
    with pytest.raises(ModelFolderError, match="logit_bias.*drop_logit_bias=True"):
        cconv.save_clip(tmp_path, cfg, params)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.warns(UserWarning, match="dropping logit_bias"):
        cconv.save_clip(tmp_path, cfg, params, drop_logit_bias=True)
    cfg2, params2 = cconv.load_clip(tmp_path)
    assert cfg2 == dataclasses.replace(cfg, logit_bias_init=None)
    jax.tree.map(
        np.testing.assert_array_equal,
        params2,
        {k: v for k, v in params.items() if k != "logit_bias"},
    )


def test_save_refuses_mismatched_parts(tmp_path, tokenizer_dir):
    cfg = clip.PRESETS["tiny"]
    params = tiny_params()
    with pytest.raises(ModelFolderError, match="49408 token ids but the text tower embeds 1000"):
        cconv.save_clip(tmp_path, cfg, params, tokenizer_folder=tokenizer_dir)
    with pytest.raises(
        ModelFolderError, match=r"'<\|endoftext\|>' \(id 49407\).*eos_token_id 49406"
    ):
        cconv._tokenizer_files(tokenizer_dir, clip.TextConfig(eos_token_id=49406))
    wrong = dict(params, visual_projection={"kernel": jnp.zeros((32, 8))})
    with pytest.raises(
        ModelFolderError, match=r"visual_projection/kernel: \(32, 8\), config says \(32, 16\)"
    ):
        cconv.save_clip(tmp_path, cfg, wrong)
    assert not (tmp_path / "model.safetensors").exists()

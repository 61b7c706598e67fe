"""CLIP: the sharded contrastive losses against one device, the CLIP task through the train step on
8 devices, overfitting a batch, the shapes-world tokenizer, the evaluation metrics and CLIs.
(Parity with transformers' CLIPModel is tests/test_clip_parity.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import sharding as sh
from jaxdiff.models import clip as clip_lib
from jaxdiff.train import contrastive as C
from jaxdiff.train.clip import CLIPConfigTrain, clip_task
from jaxdiff.train.optim import OptimConfig
from jaxdiff.train.step import init_state, make_train_step

BATCH_AXES = (sh.DATA, sh.FSDP)


def _embeddings(b=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return unit(jax.random.normal(k1, (b, d))), unit(jax.random.normal(k2, (b, d)))


def _naive_softmax(img, txt, s):
    # the textbook form: cross-entropy over rows and over columns, with optax's implementation
    import optax

    logits = np.exp(s) * np.asarray(img) @ np.asarray(txt).T
    labels = np.arange(len(logits))
    return (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    ) / 2


def test_single_device_losses_match_closed_forms():
    img, txt = _embeddings()
    loss, m = C.contrastive_loss(img, txt, jnp.float32(2.0))
    np.testing.assert_allclose(loss, _naive_softmax(img, txt, 2.0), rtol=1e-6)
    logits = np.exp(1.5) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T - 4.0
    z = 2 * np.eye(16) - 1
    expect = np.sum(np.log1p(np.exp(-z * logits))) / 16  # -sum log sigmoid(z * logits) / B
    loss, _ = C.contrastive_loss(img, txt, jnp.float32(1.5), jnp.float32(-4.0), kind="sigmoid")
    np.testing.assert_allclose(loss, expect, rtol=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        C.contrastive_loss(img, txt, jnp.float32(1.0), kind="hinge")
    with pytest.raises(ValueError, match="needs a logit bias"):
        C.contrastive_loss(img, txt, jnp.float32(1.0), kind="sigmoid")


@pytest.mark.parametrize("kind", C.LOSSES)
@pytest.mark.parametrize("shape", [(2, 4, 1), (8, 1, 1)])
def test_sharded_loss_and_gradients_equal_one_device(kind, shape):
    mesh = sh.make_mesh(shape)
    img, txt = _embeddings(b=32)
    s, b = jnp.float32(2.3), jnp.float32(-3.0)
    one = lambda i, t, s, b: C.contrastive_loss(i, t, s, b, kind=kind)  # noqa: E731
    many = lambda i, t, s, b: C.contrastive_loss(
        i, t, s, b, kind=kind, mesh=mesh, batch_axes=BATCH_AXES
    )  # noqa: E731
    (l1, m1), g1 = jax.value_and_grad(one, argnums=(0, 1, 2, 3), has_aux=True)(img, txt, s, b)
    split = NamedSharding(mesh, P(BATCH_AXES))
    (l8, m8), g8 = jax.jit(jax.value_and_grad(many, argnums=(0, 1, 2, 3), has_aux=True))(
        jax.device_put(img, split), jax.device_put(txt, split), s, b
    )
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for a, c in zip(g8, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
    assert (
        float(jnp.abs(g1[2])) > 1e-3 and float(jnp.abs(g1[0]).max()) > 1e-3
    )  # gradients are not trivially 0
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k])


def _clip_batch(n=16, seed=0):
    cfg = clip_lib.PRESETS["tiny"]
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    tokens = np.full((n, 16), cfg.text.eos_token_id, np.int32)
    tokens[:, 0] = cfg.text.bos_token_id
    tokens[:, 1:5] = rng.integers(0, 900, (n, 4))
    return {"image": images, "tokens": tokens}


def _train(mesh, rules, steps, loss="softmax", lr=3e-3, batch=None):
    cfg = clip_lib.PRESETS["tiny"]
    if loss == "sigmoid":
        cfg = clip_lib.dataclasses.replace(
            cfg, logit_bias_init=-10.0, logit_scale_init=float(np.log(10))
        )
    task = clip_task(CLIPConfigTrain(loss=loss), cfg, mesh=mesh, rules=rules)
    optim = OptimConfig(learning_rate=lr, warmup_steps=0, total_steps=steps, weight_decay=0.0)
    state, shardings, tx = init_state(task, optim, mesh, rules, seed=0)
    from jaxdiff.data.pipeline import batch_sharding

    b = jax.device_put(batch or _clip_batch(), batch_sharding(mesh, rules))
    step = make_train_step(task, tx, optim, shardings, None, jax.tree.map(lambda x: x.sharding, b))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, None, b)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("loss", C.LOSSES)
def test_clip_task_loss_and_gradients_on_8_devices_equal_one_device(loss):
    """The task's loss (towers + contrastive loss) on a (data 2, fsdp 4) mesh, params FSDP-sharded:
    its value and every gradient equal the one-device computation on the same global batch."""

    def grads(mesh):
        cfg = clip_lib.PRESETS["tiny"]
        if loss == "sigmoid":
            cfg = clip_lib.dataclasses.replace(
                cfg, logit_bias_init=-10.0, logit_scale_init=float(np.log(10))
            )
        task = clip_task(CLIPConfigTrain(loss=loss), cfg, mesh=mesh, rules=sh.FSDP_RULES)
        state, _, _ = init_state(task, OptimConfig(), mesh, sh.FSDP_RULES, seed=0)
        from jaxdiff.data.pipeline import batch_sharding

        b = jax.device_put(_clip_batch(), batch_sharding(mesh, sh.FSDP_RULES))
        f = jax.jit(
            jax.value_and_grad(lambda p, b: task.loss(p, None, b, jax.random.key(0)), has_aux=True)
        )
        return f(state.params, b), state.params

    ((l8, m8), g8), p8 = grads(sh.make_mesh((2, 4, 1)))
    ((l1, m1), g1), _ = grads(sh.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    assert (
        p8["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec[0] == "fsdp"
    )
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-6)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale
        ),
        g8,
        g1,
    )
    assert ("logit_bias" in g1) == (loss == "sigmoid")


def test_clip_train_steps_on_8_devices_track_one_device():
    many, l8 = _train(sh.make_mesh((2, 4, 1)), sh.FSDP_RULES, 3)
    one, l1 = _train(sh.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sh.FSDP_RULES, 3)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)


def test_clip_overfits_one_batch():
    mesh = sh.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, losses = _train(mesh, sh.DATA_PARALLEL, 120, lr=3e-3)
    assert losses[-1] < losses[0] / 10, losses[::20]


def test_shapes_tokenizer_agrees_with_openai_vocabulary(tmp_path):
    from jaxdiff.data import shapes_world as sw
    from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer, write_small_clip_tokenizer

    cfg = clip_lib.PRESETS["shapes"].text
    small = Tokenizer(
        write_small_clip_tokenizer(tmp_path / "s", sw.vocabulary(), max_length=20), 20
    )
    full = Tokenizer(write_clip_tokenizer(tmp_path / "f"), 77)
    assert (
        len(small._tok) == cfg.vocab_size
        and small.eos_id == cfg.eos_token_id
        and small.bos_id == cfg.bos_token_id
    )
    toks = lambda t, c: t._tok.convert_ids_to_tokens(t._tok(c)["input_ids"])  # noqa: E731
    for split in ("train", "heldout"):
        for i in range(300):
            cap = sw.sample_scene(split, i).caption
            assert toks(small, cap) == toks(full, cap), cap
            assert len(small._tok(cap)["input_ids"]) <= cfg.max_position_embeddings
    assert (
        small.decode(small(["a magenta hexagon"])[0]) == "a magenta hexagon"
    )  # unknown words still tokenize
    with pytest.raises(ValueError, match="lower-case ASCII word"):
        write_small_clip_tokenizer(tmp_path / "x", ["Red"])


def test_config_dict_round_trip():
    for cfg in clip_lib.PRESETS.values():
        assert (
            clip_lib.config_from_dict(json.loads(json.dumps(clip_lib.config_to_dict(cfg)))) == cfg
        )


def test_vision_tower_refuses_wrong_image_size():
    cfg = clip_lib.PRESETS["tiny"]
    params = clip_lib.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="do not fit the vision tower"):
        clip_lib.CLIP(cfg).apply(
            {"params": params}, jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 48, 48, 3))
        )


# --- evaluation ---------------------------------------------------------------------------------


def test_retrieval_zero_shot_and_score_on_known_embeddings():
    from jaxdiff.eval import clip as ce

    e = np.eye(4, dtype=np.float32)
    caps = ["a", "b", "c", "d"]
    r = ce.retrieval(e, e, caps, ks=(1, 2))
    assert r["text_to_image"]["R@1"] == 1.0 and r["image_to_text"]["R@1"] == 1.0
    txt = e[[1, 0, 2, 3]]  # captions 0 and 1 swapped: half right at 1, all at 2
    r = ce.retrieval(e, txt, caps, ks=(1, 2))
    assert r["image_to_text"]["R@1"] == 0.5 and r["text_to_image"]["R@1"] == 0.5
    r = ce.retrieval(
        e, txt, ["a", "a", "c", "d"], ks=(1,)
    )  # identical captions: either image is a hit
    assert r["image_to_text"]["R@1"] == 1.0 and r["text_to_image"]["R@1"] == 1.0
    z = ce.zero_shot(
        e[:3], [0, 1, 1], e[:2], ["x", "y"]
    )  # image 2 is nearest neither: argmax picks x
    assert z["accuracy"] == pytest.approx(2 / 3) and z["per_class"] == {"x": 1.0, "y": 0.5}
    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    np.testing.assert_allclose(ce.clip_score(a, np.array([[0.6, 0.8], [-0.6, -0.8]])), [60.0, 0.0])


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    from jaxdiff.train import cli

    work = tmp_path_factory.mktemp("clip_run")
    cli.main(
        [
            "--config",
            "configs/shapes_sd/clip.py:smoke",
            "--workdir",
            str(work),
            "--config.loop.steps=3",
            "--config.model.preset=tiny",
            "--config.data.resolution=32",
        ]
    )
    saved = clip_lib.config_from_dict(json.loads((work / "clip.json").read_text()))
    assert (
        saved.text.eos_token_id == 643 and saved.text.vocab_size == 1000
    )  # the shapes tokenizer's ids
    return work


def test_clip_smoke_run_refuses_a_bad_tokenizer_and_size(tmp_path):
    from jaxdiff.train import cli

    with pytest.raises(
        SystemExit, match="does not fit the text tower"
    ):  # 49,408 ids into a 1,000-row table
        cli.main(
            [
                "--config",
                "configs/shapes_sd/clip.py:smoke",
                "--workdir",
                str(tmp_path),
                "--config.model.preset=tiny",
                "--config.data.resolution=32",
                "--config.model.tokenizer=clip",
            ]
        )
    with pytest.raises(SystemExit, match="image_size"):
        cli.main(
            [
                "--config",
                "configs/shapes_sd/clip.py:smoke",
                "--workdir",
                str(tmp_path),
                "--config.model.preset=shapes",
                "--config.data.resolution=32",
            ]
        )


def test_eval_clip_cli_on_a_training_run(clip_run, tmp_path, capsys):
    from jaxdiff.eval import cli

    out = tmp_path / "report.json"
    cli.main(
        ["clip", "--model", str(clip_run), "--n", "40", "--split", "validation", "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert "zero-shot colour" in text and "text to image" in text
    r = json.loads(out.read_text())
    assert (
        r["n"] == 40
        and r["split"] == "validation"
        and 0 <= r["retrieval"]["text_to_image"]["R@1"] <= 1
    )
    assert 0 < r["zero_shot_colour"]["n"] < 40
    # the same numbers from Python, on the same model
    from jaxdiff.eval import clip as ce

    again = ce.shapes_world_report(ce.load(clip_run), "validation", 40)
    assert again["retrieval"] == r["retrieval"] and again["zero_shot_shape"] == r["zero_shot_shape"]
    with pytest.raises(SystemExit, match="unknown split"):
        cli.main(["clip", "--model", str(clip_run), "--n", "4", "--split", "test"])
    with pytest.raises(SystemExit, match="neither a jaxdiff CLIP run"):
        cli.main(["clip", "--model", str(tmp_path), "--n", "4"])


def test_clip_score_cli(clip_run, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.data import shapes_world as sw
    from jaxdiff.eval import cli
    from jaxdiff.eval import clip as ce

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    scenes = [sw.sample_scene("validation", i) for i in range(3)]
    for i, s in enumerate(scenes):
        Image.fromarray(sw.render(s, 64)).save(imgs / f"{i}.png")  # resized to 32 by preprocess
        (imgs / f"{i}.txt").write_text(s.caption)
    cli.main(["clip-score", "--model", str(clip_run), "--images", str(imgs)])
    r = json.loads((imgs / "clip_score.json").read_text())
    model = ce.load(clip_run)
    expect = ce.clip_score(
        model.embed_images([sw.render(s, 64) for s in scenes]),
        model.embed_texts([s.caption for s in scenes]),
    )
    np.testing.assert_allclose(r["per_image"], expect, rtol=1e-5)
    assert r["captions"] == [s.caption for s in scenes]


def test_b16_pod_config_builds_a_sharded_b16(tmp_path):
    """configs/clip_b16_pod.py: the task it builds traces at B/16 size on an 8-device fsdp mesh (shapes
    only: nothing is allocated), its kernels split over fsdp and the loss sees the global batch."""
    from flax import linen as nn

    from jaxdiff.train import cli

    config = cli.apply_overrides(
        cli.load_config("configs/clip_b16_pod.py"), ["data.global_batch=16"]
    )
    mesh, rules = sh.make_mesh((1, 8, 1)), sh.RULE_SETS[config.mesh.rules]
    task, tok = cli.build(config, mesh, rules, tmp_path)
    assert tok.max_length == 77 and len(tok._tok) == 49408
    boxed = jax.eval_shape(task.init, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(boxed)))
    assert 140e6 < n < 160e6, n  # ViT-B/16 CLIP: ~150M params
    shard = sh.param_shardings(boxed, mesh, rules)
    assert shard["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].spec[0] == sh.FSDP
    batch = {
        "image": jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((16, 77), jnp.int32),
    }
    loss, metrics = jax.eval_shape(
        lambda p, b: task.loss(p, None, b, jax.random.key(0)), nn.unbox(boxed), batch
    )
    assert loss.shape == () and set(metrics) >= {"i2t_acc", "t2i_acc", "temperature"}
    assert json.loads((tmp_path / "clip.json").read_text())["vision"]["patch_size"] == 16


def test_export_a_run_to_a_clip_model_folder(clip_run, tmp_path):
    import torch
    from transformers import CLIPModel

    from jaxdiff import cli
    from jaxdiff.eval import clip as ce

    out = tmp_path / "exported"
    cli.main(["export", "--workdir", str(clip_run), "--out", str(out)])
    run, exported = ce.load(clip_run), ce.load(out)  # the folder loads back, tokenizer included
    assert exported.config == run.config
    assert ce.shapes_world_report(exported, "validation", 16) == ce.shapes_world_report(
        run, "validation", 16
    )
    ids = run.tokenizer(["a red circle", "two blue stars"])
    pixels = np.asarray(clip_lib.preprocess([np.zeros((32, 32, 3), np.uint8)], run.config))
    ours = clip_lib.CLIP(run.config).apply(
        {"params": run.params}, jnp.asarray(ids), jnp.asarray(pixels)
    )
    with torch.no_grad():
        theirs = CLIPModel.from_pretrained(out)(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
        )
    np.testing.assert_allclose(
        np.asarray(ours["logits_per_image"]), theirs.logits_per_image.numpy(), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(SystemExit, match="not empty"):
        cli.main(["export", "--workdir", str(clip_run), "--out", str(out)])


def test_committed_shapes_clip_loads_and_works():
    """models/shapes_clip (trained here, see its README): loads through the transformers-folder path and
    is far above chance on validation (a random model: 1/8 colour, 1 % recall@1)."""
    from jaxdiff.eval import clip as ce

    model = ce.load("models/shapes_clip")
    assert model.config == clip_lib.dataclasses.replace(
        clip_lib.PRESETS["shapes"], logit_scale_init=model.config.logit_scale_init
    )
    r = ce.shapes_world_report(model, "validation", 200)
    assert (
        r["zero_shot_colour"]["accuracy"] > 0.95 and r["retrieval"]["text_to_image"]["R@5"] > 0.8
    ), r


def test_clip_score_with_one_prompt_on_non_square_images(clip_run, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.eval import cli
    from jaxdiff.eval import clip as ce

    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ]
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    cli.main(
        [
            "clip-score",
            "--model",
            str(clip_run),
            "--images",
            str(tmp_path),
            "--prompt",
            "a red circle",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    model = ce.load(clip_run)
    expect = ce.clip_score(model.embed_images(imgs), model.embed_texts(["a red circle"] * 2))
    np.testing.assert_allclose(
        json.loads((tmp_path / "s.json").read_text())["per_image"], expect, rtol=1e-5
    )

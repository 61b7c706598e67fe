"""The shapes-world Stable Diffusion recipe at tiny size: CLIP run -> VAE run -> VAE fine-tune -> exported VAE (measured
latent scale) -> LDM run on both -> exported diffusers folder that diffusers and jaxdiff sample alike;
then the evaluation study, the VAE PSNR command, the demo grid and the default model."""

import json
import xml.etree.ElementTree as ET

import jax
import numpy as np
import pytest
import torch

from jaxdiff import cli as top
from jaxdiff.train import cli as train_cli


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    train_cli.main(
        [
            "--config",
            "configs/clip_shapes.py:smoke",
            "--workdir",
            str(root / "clip"),
            "--config.loop.steps=2",
        ]
    )
    train_cli.main(
        [
            "--config",
            "configs/vae_shapes.py:smoke",
            "--workdir",
            str(root / "vae"),
            "--config.loop.steps=2",
        ]
    )
    train_cli.main(
        [
            "--config",
            "configs/vae_shapes_ft.py:smoke",
            "--workdir",
            str(root / "vae_ft"),
            "--config.loop.steps=2",
            f"--config.model.model_dir={root / 'vae'}",
        ]
    )
    top.main(["export", "--workdir", str(root / "vae_ft"), "--out", str(root / "vae_out")])
    train_cli.main(
        [
            "--config",
            "configs/ldm_shapes.py:smoke",
            "--workdir",
            str(root / "ldm"),
            "--config.loop.steps=2",
            f"--config.model.vae_workdir={root / 'vae_out'}",
            f"--config.model.text_encoder={root / 'clip'}",
            "--config.model.scaling_factor=0",
        ]
    )
    top.main(["export", "--workdir", str(root / "ldm"), "--out", str(root / "sd")])
    return root


def test_exported_vae_carries_the_measured_latent_scale(recipe):
    from jaxdiff.convert.runs import load_vae
    from jaxdiff.train.export import latent_scaling_factor

    cfg = json.loads((recipe / "vae_out" / "config.json").read_text())
    vcfg, params = load_vae(recipe / "vae_ft")
    expect = latent_scaling_factor(vcfg, params, "synthetic:256", 32)
    assert (
        cfg["scaling_factor"] == pytest.approx(expect, rel=1e-6)
        and cfg["scaling_factor"] != 0.18215
    )
    ldm = json.loads((recipe / "ldm" / "ldm.json").read_text())
    assert ldm["vae"]["scaling_factor"] == pytest.approx(
        expect, rel=1e-5
    )  # re-measured by the LDM run
    assert ldm["sources"]["text_encoder"] == str(recipe / "clip")


def test_vae_fine_tune_starts_from_its_model_dir(recipe, tmp_path):
    """Stage 2 of the VAE recipe starts from stage 1's weights (with lr 0 it keeps them) and has its config."""
    from jaxdiff.convert.runs import load_vae

    train_cli.main(
        [
            "--config",
            "configs/vae_shapes_ft.py:smoke",
            "--workdir",
            str(tmp_path / "ft"),
            "--config.loop.steps=1",
            "--config.optim.learning_rate=0",
            f"--config.model.model_dir={recipe / 'vae'}",
        ]
    )
    (c1, p1), (c2, p2) = load_vae(recipe / "vae"), load_vae(tmp_path / "ft")
    assert c1 == c2
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit, match="model.model_dir"):
        train_cli.main(
            [
                "--config",
                "configs/vae_shapes_ft.py:smoke",
                "--workdir",
                str(tmp_path / "bad"),
                f"--config.model.model_dir={tmp_path / 'nowhere'}",
            ]
        )


def test_text_encoder_trained_with_the_unet(recipe, tmp_path):
    """ldm.train_text_encoder: the CLIP's text tower starts the run, gets gradients, and the export carries
    the trained tower (not the CLIP's)."""
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params
    from jaxdiff.eval.clip import load as load_clip_model
    from jaxdiff.models import clip as clip_lib

    train_cli.main(
        [
            "--config",
            "configs/ldm_shapes.py:smoke",
            "--workdir",
            str(tmp_path / "ldm"),
            "--config.loop.steps=2",
            f"--config.model.vae_workdir={recipe / 'vae_out'}",
            f"--config.model.text_encoder={recipe / 'clip'}",
            "--config.model.scaling_factor=0",
            "--config.ldm.train_text_encoder=True",
        ]
    )
    params, _ = load_run_params(tmp_path / "ldm", prefer_ema=False)
    assert set(params) == {"unet", "text_encoder"}
    clip_model = load_clip_model(recipe / "clip")
    _, start = clip_lib.text_encoder(clip_model.config, clip_model.params)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert flat(start).shape == flat(params["text_encoder"]).shape
    assert not np.allclose(flat(start), flat(params["text_encoder"]))  # it trained
    top.main(
        [
            "export",
            "--workdir",
            str(tmp_path / "ldm"),
            "--out",
            str(tmp_path / "sd"),
            "--raw-params",
        ]
    )
    sd = load_pretrained(tmp_path / "sd")
    np.testing.assert_allclose(
        flat(sd.params["text_encoder"]), flat(params["text_encoder"]), rtol=1e-6
    )


def test_exported_model_samples_like_diffusers(recipe):
    from jaxdiff.convert.pretrained import load_pretrained

    sd = load_pretrained(recipe / "sd")
    assert (
        sd.tokenizer.max_length == 16 and len(sd.tokenizer._tok) == 644
    )  # the CLIP run's shapes tokenizer
    _assert_samples_like_diffusers(recipe / "sd")


def test_exported_tokenizer_is_only_the_tokenizer(tmp_path):
    """An LDM whose text encoder came from an exported CLIPModel folder gets that folder's tokenizer files,
    not its weights and configs."""
    from jaxdiff.convert.diffusers import ModelFolderError
    from jaxdiff.convert.pretrained import copy_tokenizer

    clip = tmp_path / "clip"
    clip.mkdir()
    for name in (
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "config.json",
        "model.safetensors",
        "README.md",
    ):
        (clip / name).write_text(name)
    copy_tokenizer(clip, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    with pytest.raises(ModelFolderError, match="no tokenizer files"):
        copy_tokenizer(tmp_path / "tok" / "nowhere", tmp_path / "tok2")


def test_zero_snr_stage_from_an_exported_model(recipe, tmp_path):
    """Stage 2 of the UNet recipe: starts from an exported model (its UNet, text tower and VAE), trains on
    the zero-terminal-SNR schedule with v-prediction, and exports a model whose scheduler says so and
    which diffusers samples alike (DDIM, trailing spacing, from pure noise)."""
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.train import tasks

    train_cli.main(
        [
            "--config",
            "configs/ldm_shapes_zsnr.py:smoke",
            "--workdir",
            str(tmp_path / "ldm"),
            "--config.loop.steps=2",
            f"--config.model.model_dir={recipe / 'sd'}",
        ]
    )
    top.main(["export", "--workdir", str(tmp_path / "ldm"), "--out", str(tmp_path / "sd")])
    sched = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert (
        sched["prediction_type"],
        sched["rescale_betas_zero_snr"],
        sched["timestep_spacing"],
    ) == ("v_prediction", True, "trailing")
    base, tuned = load_pretrained(recipe / "sd"), load_pretrained(tmp_path / "sd")
    for a, b in zip(
        jax.tree.leaves(base.params["vae"]), jax.tree.leaves(tuned.params["vae"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # the VAE came from model_dir
    assert tuned.vae_config.scaling_factor == base.vae_config.scaling_factor
    _assert_samples_like_diffusers(tmp_path / "sd")
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        tasks.ldm_task(
            tasks.LDMConfig(rescale_betas_zero_snr=True), None, None, None, {}, np.zeros(4)
        )


def test_random_text_tower_stage(recipe, tmp_path):
    """Stage 3 of the UNet recipe: an exported model's UNet and VAE with a new random text tower trained
    with the UNet; the export carries the trained tower (not the base model's), and a frozen random
    tower is refused before anything is built."""
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params

    argv = [
        "--config",
        "configs/ldm_shapes_text.py:smoke",
        "--workdir",
        str(tmp_path / "ldm"),
        "--config.loop.steps=2",
        f"--config.model.model_dir={recipe / 'sd'}",
    ]
    train_cli.main(argv)
    assert (
        json.loads((tmp_path / "ldm" / "ldm.json").read_text())["sources"]["text_encoder"]
        == "random"
    )
    top.main(["export", "--workdir", str(tmp_path / "ldm"), "--out", str(tmp_path / "sd")])
    base, tuned = load_pretrained(recipe / "sd"), load_pretrained(tmp_path / "sd")
    trained, _ = load_run_params(tmp_path / "ldm")
    for a, b in zip(
        jax.tree.leaves(trained["text_encoder"]),
        jax.tree.leaves(tuned.params["text_encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    emb = lambda sd: sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]  # noqa: E731
    assert emb(base).shape == emb(tuned).shape and not np.allclose(emb(base), emb(tuned), atol=1e-2)
    for a, b in zip(
        jax.tree.leaves(base.params["vae"]), jax.tree.leaves(tuned.params["vae"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    _assert_samples_like_diffusers(tmp_path / "sd")
    with pytest.raises(SystemExit, match="needs ldm.train_text_encoder=True"):
        train_cli.main(
            argv[:3]
            + [str(tmp_path / "frozen"), "--config.ldm.train_text_encoder=False"]
            + argv[4:]
        )
    assert not (tmp_path / "frozen" / "checkpoints").exists()


def test_position_embedding_stage(recipe, tmp_path):
    """configs/ldm_shapes_pos.py: an exported model's UNet given a position embedding and trained on; the
    export records it (a key diffusers does not know) and carries the trained map; jaxdiff samples it."""
    from jaxdiff.convert.diffusers import POSITION_KEY
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params
    from jaxdiff.pipelines.stable_diffusion import Pipeline

    train_cli.main(
        [
            "--config",
            "configs/ldm_shapes_pos.py:smoke",
            "--workdir",
            str(tmp_path / "ldm"),
            "--config.loop.steps=2",
            f"--config.model.model_dir={recipe / 'sd'}",
        ]
    )
    top.main(["export", "--workdir", str(tmp_path / "ldm"), "--out", str(tmp_path / "sd")])
    assert json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())[POSITION_KEY] == 4
    sd, (trained, _) = load_pretrained(tmp_path / "sd"), load_run_params(tmp_path / "ldm")
    assert sd.unet_config.position_embedding == 4
    np.testing.assert_array_equal(
        sd.params["unet"]["position_embedding"]["kernel"],
        trained["unet"]["position_embedding"]["kernel"],
    )
    assert "position_embedding" not in load_pretrained(recipe / "sd").params["unet"]
    img = Pipeline.from_model(sd).txt2img(
        "a red circle on the left", steps=3, guidance=3.0, seed=0, height=32, width=32
    )
    assert np.asarray(img).shape == (1, 32, 32, 3) and np.isfinite(np.asarray(img)).all()
    with pytest.raises(SystemExit, match="unet_position_embedding=-1.*>= 0"):
        train_cli.main(
            [
                "--config",
                "configs/ldm_shapes_pos.py:smoke",
                "--workdir",
                str(tmp_path / "bad"),
                f"--config.model.model_dir={recipe / 'sd'}",
                "--config.model.unet_position_embedding=-1",
            ]
        )
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # stage 4 (configs/ldm_shapes_long.py) trains that export on: its map kept as it is, nothing new added
    train_cli.main(
        [
            "--config",
            "configs/ldm_shapes_long.py:smoke",
            "--workdir",
            str(tmp_path / "long"),
            "--config.loop.steps=2",
            f"--config.model.model_dir={tmp_path / 'sd'}",
            "--config.optim.learning_rate=0",
        ]
    )
    longer, _ = load_run_params(tmp_path / "long")
    assert jax.tree_util.tree_structure(longer["unet"]) == jax.tree_util.tree_structure(
        sd.params["unet"]
    )
    np.testing.assert_allclose(
        longer["unet"]["position_embedding"]["kernel"],
        sd.params["unet"]["position_embedding"]["kernel"],
        rtol=1e-6,
    )


def test_context_refiner_stage(recipe, tmp_path):
    """configs/ldm_shapes_ctx.py: an exported model's UNet given a context refiner and trained on. Before any
    step its UNet computes exactly what the one it started from does (zero-initialised branches); the export records the
    refiner (a key diffusers does not know) and carries its trained tensors; jaxdiff samples it; a bad
    value is refused before anything is written."""
    from jaxdiff.convert.diffusers import REFINER_KEY
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params
    from jaxdiff.pipelines.stable_diffusion import Pipeline

    base = load_pretrained(recipe / "sd")
    args = [
        "--config",
        "configs/ldm_shapes_ctx.py:smoke",
        f"--config.model.model_dir={recipe / 'sd'}",
        "--config.model.unet_position_embedding=0",
    ]  # the recipe's UNet has none: only the refiner is new
    import dataclasses

    from flax import linen as nn

    from jaxdiff.models.unet import UNet

    config = train_cli.apply_overrides(
        train_cli.load_config(args[1]), [a[len("--config.") :] for a in args[2:]]
    )
    start = nn.unbox(train_cli.build(config)[0].init(jax.random.key(0)))[
        "unet"
    ]  # what step 1 starts from
    x, ctx = (
        jax.random.normal(jax.random.key(0), (2, 4, 4, 4)),
        jax.random.normal(jax.random.key(1), (2, 20, 32)),
    )
    eps = lambda cfg, p: UNet(cfg).apply({"params": p}, x, np.array([10, 900]), ctx)  # noqa: E731
    assert "context_refiner" in start and "context_refiner" not in base.params["unet"]
    np.testing.assert_array_equal(
        eps(dataclasses.replace(base.unet_config, context_refiner=2), start),
        eps(base.unet_config, base.params["unet"]),
    )  # the same UNet function before any step
    sample = lambda sd: np.asarray(
        Pipeline.from_model(sd).txt2img(  # noqa: E731
            "a red circle to the left of a blue square",
            steps=3,
            guidance=3.0,
            seed=0,
            height=32,
            width=32,
        )
    )
    train_cli.main(args + ["--workdir", str(tmp_path / "ldm"), "--config.loop.steps=2"])
    top.main(["export", "--workdir", str(tmp_path / "ldm"), "--out", str(tmp_path / "sd")])
    assert json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())[REFINER_KEY] == 2
    sd, (trained, _) = load_pretrained(tmp_path / "sd"), load_run_params(tmp_path / "ldm")
    assert sd.unet_config.context_refiner == 2 and "context_refiner" not in base.params["unet"]
    for a, b in zip(
        jax.tree.leaves(trained["unet"]["context_refiner"]),
        jax.tree.leaves(sd.params["unet"]["context_refiner"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(sample(sd)).all()
    with pytest.raises(SystemExit, match="unet_context_refiner=-1.*>= 0"):
        train_cli.main(
            args + ["--workdir", str(tmp_path / "bad"), "--config.model.unet_context_refiner=-1"]
        )
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_text_pooling_stage(recipe, tmp_path):
    """configs/ldm_shapes_pool.py: an exported model's UNet given DeepFloyd IF's pooled text (added to the time
    embedding) and trained on. Before any step it computes exactly what the one it started from does (the
    branch's last LayerNorm starts at zero); a step moves it; the export is a plain diffusers UNet config
    (addition_embed_type "text") that diffusers loads and runs as jaxdiff does; the single-file layout refuses
    it; a bad value is refused before anything is written."""
    import dataclasses

    from diffusers import UNet2DConditionModel
    from flax import linen as nn

    from jaxdiff.convert import single_file
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.models.unet import UNet

    base = load_pretrained(recipe / "sd")
    args = [
        "--config",
        "configs/ldm_shapes_pool.py:smoke",
        f"--config.model.model_dir={recipe / 'sd'}",
        "--config.model.unet_position_embedding=0",
    ]
    x, ctx = (
        jax.random.normal(jax.random.key(0), (2, 4, 4, 4)),
        jax.random.normal(jax.random.key(1), (2, 20, 32)),
    )
    t = np.array([10, 900])
    eps = lambda sd: UNet(sd.unet_config).apply({"params": sd.params["unet"]}, x, t, ctx)  # noqa: E731
    config = train_cli.apply_overrides(
        train_cli.load_config(args[1]), [a[len("--config.") :] for a in args[2:]]
    )
    start = nn.unbox(train_cli.build(config)[0].init(jax.random.key(0)))[
        "unet"
    ]  # what step 1 starts from
    pooled = dataclasses.replace(
        base.unet_config, addition_embed_type="text", addition_embed_type_num_heads=4
    )
    assert "add_embedding" not in base.params["unet"] and "add_embedding" in start
    np.testing.assert_array_equal(
        UNet(pooled).apply({"params": start}, x, t, ctx), eps(base)
    )  # the same function
    train_cli.main(
        args
        + [
            "--workdir",
            str(tmp_path / "one"),
            "--config.optim.learning_rate=1e-3",
            "--config.loop.steps=2",
        ]
    )  # the first step's lr is 0 (warm-up)
    top.main(
        [
            "export",
            "--workdir",
            str(tmp_path / "one"),
            "--out",
            str(tmp_path / "one_sd"),
            "--raw-params",
        ]
    )
    one = load_pretrained(tmp_path / "one_sd")
    assert one.unet_config == pooled
    assert (
        float(np.abs(one.params["unet"]["add_embedding"]["norm2"]["scale"]).max()) > 0
    )  # the branch opens
    assert float(np.abs(eps(one) - eps(base)).max()) > 0
    cfg = json.loads((tmp_path / "one_sd" / "unet" / "config.json").read_text())
    assert (cfg["addition_embed_type"], cfg["addition_embed_type_num_heads"]) == ("text", 4)
    theirs = UNet2DConditionModel.from_pretrained(str(tmp_path / "one_sd" / "unet")).eval()
    with torch.no_grad():
        ref = (
            theirs(
                torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2),
                torch.from_numpy(t),
                torch.from_numpy(np.asarray(ctx)),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    np.testing.assert_allclose(eps(one), ref, atol=2e-4, rtol=1e-3)
    with pytest.raises(single_file.ConversionError, match="pooled text"):
        single_file.single_file_state_dict(
            unet=(one.unet_config, one.params["unet"]), vae=None, text_encoder=None
        )
    with pytest.raises(SystemExit, match=r"unet_text_pooling=-1: expected a number of heads >= 0"):
        train_cli.main(
            args
            + [
                "--workdir",
                str(tmp_path / "bad"),
                "--config.model.unet_text_pooling=-1",
                "--config.loop.steps=1",
            ]
        )
    with pytest.raises(SystemExit, match="unet_text_pooling=5.*does not split into 5 heads"):
        train_cli.main(
            args
            + [
                "--workdir",
                str(tmp_path / "bad"),
                "--config.model.unet_text_pooling=5",
                "--config.loop.steps=1",
            ]
        )
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_relation_probe(recipe, tmp_path, capsys):
    """python -m jaxdiff.eval.relation_probe: the x0 estimate at t = T from each prediction type, the measured
    and the fitted pairs disjoint, a 2-step fit with either target, the JSON written whole, bad arguments
    refused before the model loads."""
    import jax.numpy as jnp

    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.eval import relation_probe as rp

    with pytest.raises(ValueError, match="not a shapes-world size"):
        rp.Probe(load_pretrained(recipe / "sd"), 48)
    probe = rp.Probe(load_pretrained(recipe / "sd"), 32)  # the recipe trains at 32 px
    x, out, t = jnp.full((1, 2, 2, 1), 2.0), jnp.full((1, 2, 2, 1), 0.5), jnp.array([probe.T - 1])
    a = float(probe.alphas[-1])
    expect = (
        (2.0 - np.sqrt(1 - a) * 0.5) / np.sqrt(a)
        if probe.prediction == "epsilon"
        else np.sqrt(a) * 2.0 - np.sqrt(1 - a) * 0.5
    )
    np.testing.assert_allclose(np.asarray(probe.x0(x, t, out)), expect, rtol=1e-5)
    measured = rp.object_pairs(3, 0)
    assert (
        not set(measured) & set(rp.object_pairs(5, 1, exclude=measured)) and len(set(measured)) == 3
    )
    assert all(a[0] != b[0] for a, b in measured)
    for target, more in (
        ("mean", []),
        ("sample", ["--anchor", "2", "--save", str(tmp_path / "fitted")]),
    ):
        out_json = tmp_path / f"{target}.json"
        assert (
            rp.main(
                [
                    "--model",
                    str(recipe / "sd"),
                    "--resolution",
                    "32",
                    "--pairs",
                    "1",
                    "--renders",
                    "2",
                    "--noises",
                    "2",
                    "--guidance",
                    "1",
                    "--fit-steps",
                    "2",
                    "--fit-pairs",
                    "2",
                    "--target",
                    target,
                    "--batch",
                    "2",
                    "--json",
                    str(out_json),
                ]
                + more
            )
            == 0
        )
        result = json.loads(out_json.read_text())
        assert result["fit"]["target"] == target and np.isfinite(result["fit"]["loss_last_10"])
        assert result["fit"]["anchor"] == (2 if more else 0)
        rows = result["alignment"]
        assert sorted(rows) == [
            "above / below, w=1",
            "in the top left / in the bottom right, w=1",
            "to the left of / to the right of, w=1",
        ]
        assert all(
            len(r["cosines"]) == 1 and -1 <= r["cosines"][0] <= 1 and r["captions"] == 2
            for r in rows.values()
        )
    assert "| above / below, w=1 |" in capsys.readouterr().out
    # --save: the fitted UNet and text tower in a model folder beside the unchanged VAE
    old, fitted = load_pretrained(recipe / "sd"), load_pretrained(tmp_path / "fitted")
    changed = lambda k: any(
        not np.array_equal(a, b)
        for a, b in zip(  # noqa: E731
            jax.tree.leaves(old.params[k]), jax.tree.leaves(fitted.params[k])
        )
    )
    assert changed("unet") and changed("text_encoder") and not changed("vae")
    for bad, match in (
        (["--pairs", "0"], "--pairs must be >= 1"),
        (["--save", str(tmp_path / "fitted")], "give --fit-steps too"),
        (["--fit-steps", "1", "--save", str(tmp_path / "fitted")], "exists and is not empty"),
        (["--anchor", "-1"], "--anchor must be >= 0"),
        (["--json", str(tmp_path / "no" / "x.json")], "does not exist"),
    ):
        with pytest.raises(SystemExit):
            rp.main(["--model", str(tmp_path / "missing")] + bad)
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit, match="relation probe: "):
        rp.main(["--model", str(tmp_path / "missing")])


def test_the_recipe_chains_its_stages():
    """Each UNet stage of `make shapes-sd` starts from the folder the stage before it exported."""
    import shlex
    from pathlib import Path

    exported, stages, sampling = set(), 0, None
    for line in Path("Makefile").read_text().split("shapes-sd:")[1].split("\n\n")[0].splitlines():
        args = shlex.split(line.strip())[1:]
        if (
            line.strip().startswith("printf")
            and args[-1] == "models/shapes_sd/jaxdiff_sampling.json"
        ):
            sampling = json.loads(args[0].replace("\\n", "\n"))
        elif args[:1] == ["export"]:
            exported.add(args[args.index("--out") + 1])
        elif args[:1] == ["train"] and "ldm_shapes" in args[2]:
            model_dir = train_cli.load_config(args[2]).model.model_dir
            assert not model_dir or model_dir in exported, (args[2], model_dir, exported)
            stages += 1
    assert stages == 13 and "models/shapes_sd" in exported
    assert sampling == json.loads(
        Path("models/shapes_sd/jaxdiff_sampling.json").read_text()
    )  # what it measured with


def test_growing_a_unet_that_the_preset_does_not_extend_is_refused(recipe, tmp_path):
    with pytest.raises(SystemExit, match="unet_preset='shapes_deep'.*does not extend"):
        train_cli.main(
            [
                "--config",
                "configs/ldm_shapes_deep.py:smoke",
                "--workdir",
                str(tmp_path / "deep"),
                f"--config.model.model_dir={recipe / 'sd'}",
                "--config.model.unet_preset=shapes_deep",
            ]
        )


def _assert_samples_like_diffusers(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.pipelines.stable_diffusion import Pipeline

    sd = load_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    want = theirs(
        "a red circle",
        num_inference_steps=5,
        guidance_scale=5.0,
        latents=lat,
        height=32,
        width=32,
        output_type="np",
    ).images
    got = Pipeline.from_model(sd).txt2img(
        "a red circle",
        steps=5,
        guidance=5.0,
        sampler="ddim",
        latents=lat.numpy(),
        height=32,
        width=32,
    )
    psnr = 10 * np.log10(1 / max(float(np.mean((np.asarray(got) - want) ** 2)), 1e-30))
    assert psnr > 60, psnr


def test_eval_vae_command_on_run_and_export(recipe, capsys):
    from jaxdiff.eval import cli

    cli.main(["vae", "--model", str(recipe / "vae_ft"), "--n", "8", "--resolution", "32"])
    run = capsys.readouterr().out
    cli.main(["vae", "--model", str(recipe / "sd"), "--n", "8", "--resolution", "32"])
    exported = capsys.readouterr().out
    assert "reconstruction PSNR on 8 validation images" in run and run == exported
    assert "prompt fidelity of the reconstructions" in run
    with pytest.raises(SystemExit, match="not a VAE run"):
        cli.main(["vae", "--model", str(recipe / "clip"), "--n", "2"])


def test_study_tables_and_plot(recipe, tmp_path):
    from jaxdiff.eval import study
    from jaxdiff.pipelines.stable_diffusion import Pipeline

    pipe = Pipeline.from_pretrained(recipe / "sd")
    rows = study.guidance_study(
        pipe, 4, 2, steps=2, sampler="ddim", weights=(0.0, 3.0), log=lambda *_: None
    )
    assert [(r["split"], r["guidance"]) for r in rows] == [
        ("validation", 0.0),
        ("validation", 3.0),
        ("heldout", 0.0),
        ("heldout", 3.0),
    ]
    assert all(0 <= r["fidelity"] <= 1 and r["frechet"] >= 0 for r in rows)
    edits = study.sdedit_study(
        pipe, 2, steps=2, sampler="ddim", guidance=3.0, strengths=(0.5,), log=lambda *_: None
    )
    assert (
        edits[0]["strength"] == 0
        and edits[0]["kept_original"] == 1.0
        and edits[0]["edit_fidelity"] == 0.0
    )
    md = study.markdown(
        {
            "model": "m",
            "steps": 2,
            "sampler": "ddim",
            "sdedit_guidance": 3.0,
            "guidance": rows,
            "sdedit": edits,
        }
    )
    assert md.count("| validation (4) |") == 2 and "| 0.5 |" in md and "guidance only" not in md
    assert "guidance only for t / T in [0, 0.5]" in study.markdown(
        {
            "model": "m",
            "steps": 2,
            "sampler": "ddim",
            "sdedit_guidance": 3.0,
            "guidance": rows,
            "sdedit": edits,
            "guidance_interval": [0.0, 0.5],
        }
    )
    assert (
        "Why relations and counts fail" in md and md.count("| heldout | 3 |") == 2
    )  # per attribute, diagnostics
    older = [
        {k: v for k, v in r.items() if k != "diagnostics"} for r in rows
    ]  # a study.json from before
    assert "Why relations" not in study.markdown(
        {
            "model": "m",
            "steps": 2,
            "sampler": "ddim",
            "sdedit_guidance": 3.0,
            "guidance": older,
            "sdedit": edits,
        }
    )
    ET.fromstring(study.svg_plot(rows))  # well-formed SVG


def test_quick_check(recipe, tmp_path, capsys):
    """python -m jaxdiff.eval.study --quick: one w, the first captions of a kind, printed and in the JSON."""
    from jaxdiff.data import shapes_world as sw
    from jaxdiff.eval import study

    caps = study.captions_of("validation", 3, "relation")
    assert len(caps) == 3 and all(sw.parse_caption(c).kind == "relation" for c in caps)
    assert caps[0] == next(
        s.caption
        for s in map(lambda i: sw.sample_scene("validation", i), range(50))
        if s.kind == "relation"
    )
    out = tmp_path / "quick.json"
    assert (
        study.main(
            [
                "--model",
                str(recipe / "sd"),
                "--quick",
                "--kind",
                "relation",
                "--n",
                "3",
                "--heldout",
                "1",
                "--steps",
                "2",
                "--guidance",
                "2",
                "--guidance-interval",
                "0,0.5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["guidance_interval"] == [0.0, 0.5]
    assert [(r["split"], r["n"], r["guidance"], r["kind"]) for r in rows] == [
        ("validation", 3, 2.0, "relation"),
        ("heldout", 1, 2.0, "relation"),
    ]
    assert all(0 <= r["fidelity"] <= 1 and set(r["by_kind"]) >= {"relation"} for r in rows)
    assert "validation relation (3) w=2: fidelity" in capsys.readouterr().out
    for bad, match in (
        (["--quick", "--out", str(tmp_path)], "--out DIR for the study, or --quick"),
        (["--out", str(tmp_path), "--kind", "relation"], "belong to --quick"),
        (["--quick", "--kind", "relations"], "expected one of"),
        (["--quick", "--n", "0", "--heldout", "0"], "not both 0"),
        (["--quick", "--guidance-interval", "0.5,0.1"], "0 <= lo <= hi <= 1"),
        (["--out", str(tmp_path), "--weights", "1,x"], "--weights: expected numbers"),
        (["--out", str(tmp_path), "--weights", "1,-2"], "finite and >= 0"),
    ):
        with pytest.raises(SystemExit):
            study.main(["--model", str(tmp_path / "missing")] + bad)
        assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scene kind"):
        study.captions_of("validation", 1, "relations")


def test_recolour_keeps_every_other_word():
    from jaxdiff.data import shapes_world as sw
    from jaxdiff.eval.study import recolour

    rng = np.random.default_rng(0)
    for i in range(200):
        s = sw.sample_scene("validation", i)
        if s.kind not in ("single", "background"):
            continue
        edit = recolour(s, rng)
        a, b = sw.parse_caption(s.caption), sw.parse_caption(edit)
        assert b.objects[0].colour != a.objects[0].colour
        assert (b.objects[0].shape, b.objects[0].size, b.objects[0].cell, b.background) == (
            a.objects[0].shape,
            a.objects[0].size,
            a.objects[0].cell,
            a.background,
        )


def test_demo_grid_and_default_model(recipe, tmp_path, monkeypatch, capsys):
    from jaxdiff import demo
    from jaxdiff.pipelines import generate

    demo.main(
        [
            "--model",
            str(recipe / "sd"),
            "--steps",
            "2",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
            "--prompt",
            "a red circle",
            "--prompt",
            "a photo of a cat",
        ]
    )
    out = capsys.readouterr().out
    assert (tmp_path / "shapes_grid.png").is_file() and "wrote" in out
    monkeypatch.setenv(generate.DEFAULT_MODEL_ENV, str(recipe / "sd"))
    p = generate._resolve(
        "txt2img",
        generate._parser("txt2img").parse_args(["--prompt", "a red circle", "--out", "x"]),
    )
    assert p["model"] == str(recipe / "sd")
    monkeypatch.setattr(generate, "default_model_candidates", lambda: [tmp_path / "missing"])
    with pytest.raises(SystemExit, match="no default model found .* pass --model DIR"):
        demo.main(["--out", str(tmp_path)])

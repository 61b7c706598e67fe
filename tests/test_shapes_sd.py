"""The shapes-world Stable Diffusion recipe at tiny size: CLIP run -> VAE run -> VAE fine-tune -> exported VAE (measured
latent scale) -> LDM run on both -> exported diffusers folder that diffusers and jaxdiff sample alike;
then the evaluation study, the VAE PSNR command, the demo grid and the default model."""

import importlib.util
import json
import sys
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
            "configs/shapes_sd/clip.py:smoke",
            "--workdir",
            str(root / "clip"),
            "--config.loop.steps=2",
        ]
    )
    train_cli.main(
        [
            "--config",
            "configs/shapes_sd/vae.py:base,smoke",
            "--workdir",
            str(root / "vae"),
            "--config.loop.steps=2",
        ]
    )
    train_cli.main(
        [
            "--config",
            "configs/shapes_sd/vae.py:ft,smoke",
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
            "configs/shapes_sd/unet.py:base,smoke",
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
            "configs/shapes_sd/vae.py:ft,smoke",
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
                "configs/shapes_sd/vae.py:ft,smoke",
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
            "configs/shapes_sd/unet.py:base,smoke",
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
    from jaxdiff.train import ldm

    train_cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:zsnr,smoke",
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
        ldm.ldm_task(ldm.LDMConfig(rescale_betas_zero_snr=True), None, None, None, {}, np.zeros(4))


def test_random_text_tower_stage(recipe, tmp_path):
    """`model.text_encoder=random`: an exported model's UNet and VAE with a new random text tower trained
    with the UNet; the export carries the trained tower (not the base model's), and a frozen random
    tower is refused before anything is built."""
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params

    argv = [
        "--config",
        "configs/shapes_sd/unet.py:zsnr,smoke",
        "--workdir",
        str(tmp_path / "ldm"),
        "--config.loop.steps=2",
        f"--config.model.model_dir={recipe / 'sd'}",
        "--config.model.text_encoder=random",
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
    """configs/shapes_sd/unet.py:pos: an exported model's UNet given a position embedding and trained on; the
    export records it (a key diffusers does not know) and carries the trained map; jaxdiff samples it."""
    from jaxdiff.convert.diffusers import POSITION_KEY
    from jaxdiff.convert.pretrained import load_pretrained
    from jaxdiff.convert.runs import load_run_params
    from jaxdiff.pipelines.stable_diffusion import Pipeline

    train_cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:pos,smoke",
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
                "configs/shapes_sd/unet.py:pos,smoke",
                "--workdir",
                str(tmp_path / "bad"),
                f"--config.model.model_dir={recipe / 'sd'}",
                "--config.model.unet_position_embedding=-1",
            ]
        )
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # stage 4 (configs/shapes_sd/unet.py:long) trains that export on: its map kept as it is, nothing new added
    train_cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:long,smoke",
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


def test_the_recipe_chains_its_stages():
    """`make shapes-sd` runs every stage of configs/shapes_sd/unet.py in order, each from the folder the
    stage before it exported, and the last export's weights become models/shapes_sd."""
    import re
    import shlex
    from pathlib import Path

    text = Path("Makefile").read_text()
    stages = re.search(r"^UNET_STAGES := (.*)$", text, re.M).group(1).split()
    recipe = text.split("\nshapes-sd:")[1].split("\n\n")[0].replace("\\\n", " ").splitlines()[1:]
    commands = []
    for line in recipe:
        loop = re.match(r"\s*for s in \$\(UNET_STAGES\); do (.*);\s*done", line)
        body = loop.group(1) if loop else line
        for s in stages if loop else [None]:
            expanded = (
                body.replace("$${s}", str(s)).replace("$$s", str(s)).replace(" || exit 1", "")
            )
            commands += [shlex.split(c) for c in expanded.split("&&")]
    exported, trained = set(), []
    for args in commands:
        if args[0] == "cp":
            exported.add(args[-1].rstrip("/")) if args[-2].rstrip("/.") in exported else None
        elif args[1:2] == ["export"]:
            exported.add(args[args.index("--out") + 1])
        elif args[1:2] == ["train"] and "unet.py" in args[3]:
            c = train_cli.load_config(args[3])
            for start in (c.model.model_dir, c.model.vae_workdir):
                assert not start or start in exported, (args[3], start, exported)
            trained.append(args[3].split(":")[1])
    spec = importlib.util.spec_from_file_location("unet_recipe", "configs/shapes_sd/unet.py")
    recipe_module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, "configs")  # its `common`
    try:
        spec.loader.exec_module(recipe_module)
    finally:
        sys.path.pop(0)
    assert trained == stages == list(recipe_module.STAGES) and "models/shapes_sd" in exported


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

"""`jaxdiff train` as a user runs it: a config file, overrides, checkpoints, logs, resume, refusals."""

import json
from pathlib import Path

import pytest

from jaxdiff.train import cli


def test_ldm_smoke_run_then_resume(tmp_path, capsys):
    work = tmp_path / "run"
    cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:base,smoke",
            "--workdir",
            str(work),
            "--config.loop.steps=6",
            "--config.loop.checkpoint_every=3",
            "--config.loop.log_every=3",
            "--config.loop.sample_every=6",
        ]
    )
    out = capsys.readouterr().out
    assert "step 6" in out and "done: step 6" in out
    assert (
        sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6
    )
    assert any((work / "tensorboard").iterdir())
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == ["step_00000006_samples.png"]
    config = json.loads((work / "config.json").read_text())
    assert config["loop"]["steps"] == 6 and config["task"] == "ldm"
    assert json.loads((work / "versions.json").read_text())["packages"]["jax"]
    # more steps on a longer schedule: resumes from 6 (steps and the schedule's length may change)
    cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:base,smoke",
            "--workdir",
            str(work),
            "--config.loop.steps=8",
            "--config.optim.total_steps=40",
            "--config.loop.checkpoint_every=3",
            "--config.loop.log_every=3",
        ]
    )
    out = capsys.readouterr().out
    assert "resumed from step 6" in out and "done: step 8" in out
    # another run's settings in the same workdir: refused, nothing touched
    with pytest.raises(Exception, match="another run"):
        cli.main(
            [
                "--config",
                "configs/shapes_sd/unet.py:base,smoke",
                "--workdir",
                str(work),
                "--config.optim.learning_rate=0.5",
            ]
        )


def test_vae_smoke_run(tmp_path, capsys):
    cli.main(
        [
            "--config",
            "configs/shapes_sd/vae.py:base,smoke",
            "--workdir",
            str(tmp_path),
            "--config.loop.steps=3",
            "--config.loop.log_every=3",
        ]
    )
    assert "done: step 3" in capsys.readouterr().out


def test_config_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown config key 'loop.stepz' \(loop has"):
        cli.main(
            [
                "--config",
                "configs/shapes_sd/unet.py:base,smoke",
                "--workdir",
                str(tmp_path),
                "--config.loop.stepz=3",
            ]
        )
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["--config", "configs/nope.py", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected --config.KEY=VALUE"):
        cli.main(
            [
                "--config",
                "configs/shapes_sd/unet.py:base,smoke",
                "--workdir",
                str(tmp_path),
                "--config.loop.steps",
            ]
        )
    with pytest.raises(
        SystemExit,
        match=r"^jaxdiff train: .*unknown argument 'big' \(known: base, zsnr, .*, bind3, each",
    ):
        cli.main(["--config", "configs/shapes_sd/unet.py:big", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown argument 'bind,zsnr'"):
        cli.load_config("configs/shapes_sd/unet.py:bind,zsnr")
    with pytest.raises(SystemExit, match=r"sd15_finetune.py takes no argument, got 'big'"):
        cli.load_config("configs/sd15_finetune.py:big")
    with pytest.raises(
        SystemExit, match=r"config file shapes_sd/nope.py not found.*sd15_finetune.py"
    ):
        cli.load_config("shapes_sd/nope.py")
    assert (
        cli.config_file("shapes_sd/unet.py").resolve()
        == Path("configs/shapes_sd/unet.py").resolve()
    )
    for name in (
        "shapes_sd/unet.py:bind3",
        "shapes_sd/vae.py:ft",
        "shapes_sd/clip.py",
        "sd15_finetune.py",
        "clip_b16_pod.py",
    ):  # every shipped config, found by name from any folder
        c = cli.load_config(name)
        with pytest.raises(AttributeError):
            c.new_key = 1


def test_vae_with_discriminator_then_ldm_on_it(tmp_path, capsys):
    """The VAE task's patch discriminator joins after its warm-up; an LDM then trains on that VAE."""
    import numpy as np

    from jaxdiff.convert.runs import load_run_params

    vae_dir = tmp_path / "vae"
    cli.main(
        [
            "--config",
            "configs/shapes_sd/vae.py:base,smoke",
            "--workdir",
            str(vae_dir),
            "--config.loop.steps=4",
            "--config.loop.log_every=1",
            "--config.vae.disc_start=2",
        ]
    )
    out = capsys.readouterr().out
    on = [ln for ln in out.splitlines() if ln.startswith("step ") and "disc_on=" in ln]
    assert [ln.split("disc_on=")[1].split(",")[0] for ln in on] == [
        "0",
        "0",
        "1",
        "1",
    ]  # steps 1-2 warm-up
    params, step = load_run_params(vae_dir)
    assert step == 4 and set(params) == {"vae", "disc"}
    cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:base,smoke",
            "--workdir",
            str(tmp_path / "ldm"),
            "--config.loop.steps=2",
            f"--config.model.vae_workdir={vae_dir}",
            "--config.loop.sample_every=0",
        ]
    )
    assert f"frozen VAE: {vae_dir}" in capsys.readouterr().out
    import jax

    from jaxdiff.train import cli as C

    c = C.apply_overrides(
        C.load_config("configs/shapes_sd/unet.py:base,smoke"), [f"model.vae_workdir={vae_dir}"]
    )
    task, _ = C.build(c)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        task.frozen["vae"],
        params["vae"],
    )


def test_workdir_check_ignores_resumable_keys_a_run_saved(tmp_path):
    """A run saved with a key that later became resumable (optim.total_steps) still resumes."""
    from jaxdiff.train.loop import TrainingError, check_workdir

    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "run.json").write_text(
        json.dumps({"optim.total_steps": 5500, "optim.learning_rate": 5e-4})
    )
    fingerprint = {"optim.learning_rate": 5e-4}
    with pytest.raises(TrainingError, match=r"differs in \['optim.total_steps'\]"):
        check_workdir(tmp_path, fingerprint)
    assert check_workdir(tmp_path, fingerprint, resumable=cli.RESUMABLE_KEYS)
    assert json.loads((tmp_path / "run.json").read_text()) == fingerprint
    with pytest.raises(TrainingError, match=r"optim.learning_rate"):
        check_workdir(tmp_path, {"optim.learning_rate": 1e-3}, resumable=cli.RESUMABLE_KEYS)


def _logged(out, name):
    """The values of metric ``name`` in a training run's printed step lines."""
    return [
        float(part.split("=")[1])
        for line in out.splitlines()
        if line.startswith("step ")
        for part in line.split(", ")
        if part.startswith(name + "=")
    ]


def test_text_token_loss_run(tmp_path, capsys):
    # configs/shapes_sd/unet.py:words: the token-identity loss on a text tower trained with the UNet; refused
    # before anything is written when the text encoder is frozen
    with pytest.raises(SystemExit, match="text_token_loss=0.05 trains the text encoder"):
        cli.main(
            [
                "--config",
                "configs/shapes_sd/unet.py:words,smoke",
                "--workdir",
                str(tmp_path / "refused"),
                "--config.ldm.train_text_encoder=False",
            ]
        )
    assert not (tmp_path / "refused").exists()
    work = tmp_path / "words"
    cli.main(
        [
            "--config",
            "configs/shapes_sd/unet.py:words,smoke",
            "--workdir",
            str(work),
            "--config.loop.steps=2",
            "--config.loop.log_every=1",
            "--config.loop.checkpoint_every=2",
        ]
    )
    out = capsys.readouterr().out
    ce = _logged(out, "text_token_ce")
    assert len(ce) == 2 and all(c > 0 for c in ce), out
    assert "done: step 2" in out


def test_canonical_relation_stages_load_and_their_sources_open():
    # the canonical-layout and binding stages of configs/shapes_sd/unet.py keep the token-identity loss and
    # train on canonical relation layouts; their data sources, shrunk to 8 examples, open with the same
    # captions as without; options on a source that cannot take them are refused by name
    from jaxdiff.data import pipeline as pl

    for stage in ("canon_first", "canon", "bind", "bind2", "bind3"):
        c = cli.load_config(f"configs/shapes_sd/unet.py:{stage}")
        assert c.ldm.text_token_loss > 0 and c.ldm.train_text_encoder and c.model.model_dir
        spec = c.data.source.replace(":40000", ":8")
        options = cli.shapes_options(c.data)
        assert options["canonical"] and options["kinds"]
        canon, plain = (
            pl.open_source(spec, resolution=32, **o)
            for o in (options, dict(options, canonical=False))
        )
        assert [r["caption"] for r in canon] == [r["caption"] for r in plain]
    with pytest.raises(ValueError, match="data.shapes"):
        pl.open_source("synthetic:8", resolution=32, canonical=True)
    with pytest.raises(ValueError, match="data.shapes.kinds"):
        pl.open_source("shapes_world_memory:8:relation=0.5", resolution=32)

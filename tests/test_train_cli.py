"""`jaxdiff train` as a user runs it: a config file, overrides, checkpoints, logs, resume, refusals."""

import json

import pytest

from jaxdiff.train import cli


def test_ldm_smoke_run_then_resume(tmp_path, capsys):
    work = tmp_path / "run"
    cli.main(
        [
            "--config",
            "configs/ldm_shapes.py:smoke",
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
            "configs/ldm_shapes.py:smoke",
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
                "configs/ldm_shapes.py:smoke",
                "--workdir",
                str(work),
                "--config.optim.learning_rate=0.5",
            ]
        )


def test_vae_smoke_run(tmp_path, capsys):
    cli.main(
        [
            "--config",
            "configs/vae_shapes.py:smoke",
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
                "configs/ldm_shapes.py:smoke",
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
                "configs/ldm_shapes.py:smoke",
                "--workdir",
                str(tmp_path),
                "--config.loop.steps",
            ]
        )
    with pytest.raises(ValueError, match=r"unknown argument 'big' \(known: smoke\)"):
        cli.main(["--config", "configs/ldm_shapes.py:big", "--workdir", str(tmp_path)])
    with pytest.raises(
        ValueError, match=r"unknown argument 'third' \(known: smoke, second, shared\)"
    ):
        cli.load_config("configs/ldm_shapes_bind.py:third")
    for name in (
        "ldm_shapes",
        "vae_shapes",
        "sd15_finetune",
        "clip_shapes",
        "clip_b16_pod",
    ):  # every shipped config
        c = cli.load_config(f"configs/{name}.py")
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
            "configs/vae_shapes.py:smoke",
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
            "configs/ldm_shapes.py:smoke",
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
        C.load_config("configs/ldm_shapes.py:smoke"), [f"model.vae_workdir={vae_dir}"]
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


def test_stable_target_run_on_several_renders_per_caption(tmp_path, capsys):
    # ldm.stable_target needs batches with several renders of a caption: refused before anything is
    # rendered or written on data with one; trains on shapes_world_memory:N:renders=K
    with pytest.raises(SystemExit, match="several renders of one caption"):
        cli.main(
            [
                "--config",
                "configs/ldm_shapes_stf.py:smoke",
                "--workdir",
                str(tmp_path / "refused"),
                "--config.ldm.stable_target=True",
            ]
        )
    assert not (tmp_path / "refused").exists()
    work = tmp_path / "stf"
    cli.main(
        [
            "--config",
            "configs/ldm_shapes_stf.py:smoke",
            "--workdir",
            str(work),
            "--config.ldm.stable_target=True",
            "--config.data.source=shapes_world_memory:32:relation=0.5,renders=4",
            "--config.loop.steps=2",
            "--config.loop.log_every=1",
            "--config.loop.checkpoint_every=2",
        ]
    )
    out = capsys.readouterr().out
    weights = _logged(out, "stf_self_weight")
    assert len(weights) == 2 and all(0.25 <= w < 1 for w in weights), out
    assert "done: step 2" in out


def test_text_token_loss_run(tmp_path, capsys):
    # configs/ldm_shapes_words.py: the token-identity loss on a text tower trained with the UNet; refused
    # before anything is written when the text encoder is frozen
    with pytest.raises(SystemExit, match="text_token_loss=0.05 trains the text encoder"):
        cli.main(
            [
                "--config",
                "configs/ldm_shapes_words.py:smoke",
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
            "configs/ldm_shapes_words.py:smoke",
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
    # configs/ldm_shapes_canon.py (attempt 15) and configs/ldm_shapes_bind.py (attempts 17, 18): each stage keeps
    # the token-identity loss and trains on canonical relation layouts; their data sources, shrunk to 8 examples,
    # open with the same captions as without
    from jaxdiff.data import pipeline as pl

    for path in (
        "configs/ldm_shapes_canon.py:first",
        "configs/ldm_shapes_canon.py",
        "configs/ldm_shapes_bind.py",
        "configs/ldm_shapes_bind.py:second",
        "configs/ldm_shapes_bind.py:shared",
    ):
        c = cli.load_config(path)
        assert c.ldm.text_token_loss > 0 and c.ldm.train_text_encoder and c.model.model_dir
        spec = c.data.source.replace(":40000:", ":8:")
        assert ",canonical=1" in spec
        canon, plain = (
            pl.open_source(s, resolution=32) for s in (spec, spec.replace(",canonical=1", ""))
        )
        assert [r["caption"] for r in canon] == [r["caption"] for r in plain]

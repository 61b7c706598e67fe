"""`jaxdiff convert`: a single-file checkpoint becomes a diffusers folder, as a user runs it."""

import jax
import numpy as np
import pytest
import reference as ref

from jaxdiff import cli
from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.convert.single_file import save_single_file


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ref.make_pipeline_folder(root / "sd", unet=ref.UNET_SD2)
    model = load_pretrained(root / "sd")
    path = root / "model.safetensors"
    save_single_file(
        path,
        unet=(model.unet_config, model.params["unet"]),
        vae=(model.vae_config, model.params["vae"]),
        text_encoder=(model.text_config, model.params["text_encoder"]),
    )
    return root, path, model


def test_convert_to_diffusers_folder(single_file, tmp_path, capsys):
    root, path, model = single_file
    cli.main(["convert", str(path), "--out", str(tmp_path / "out"), "--config", str(root / "sd")])
    assert "wrote" in capsys.readouterr().out
    back = load_pretrained(tmp_path / "out")
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back.params, model.params)
    assert all(jax.tree.leaves(same))
    np.testing.assert_array_equal(back.tokenizer("a cat"), model.tokenizer("a cat"))
    # a second run refuses to overwrite what the first wrote
    with pytest.raises(SystemExit, match="--overwrite"):
        cli.main(
            ["convert", str(path), "--out", str(tmp_path / "out"), "--config", str(root / "sd")]
        )


def test_convert_errors_are_clear(single_file, tmp_path):
    root, path, _ = single_file
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["convert", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")])
    # this tiny architecture (2 transformer layers per block) cannot be inferred from shapes alone
    with pytest.raises(SystemExit, match="pass --config"):
        cli.main(["convert", str(path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

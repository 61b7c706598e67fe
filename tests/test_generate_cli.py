"""`jaxdiff txt2img` / `jaxdiff img2img` as a user runs them on a diffusers folder."""

import json

import numpy as np
import pytest
import reference as ref
from PIL import Image

from jaxdiff.pipelines import generate
from jaxdiff.pipelines import stable_diffusion as PL


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "tiny-sd"
    ref.make_pipeline_folder(folder)
    return folder


def test_txt2img_writes_reproducible_pngs(model, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "--model",
        str(model),
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--num-images",
        "2",
        "--seed",
        "5",
        "--height",
        "32",
        "--width",
        "24",
        "--sampler",
        "euler_a",
        "--guidance-interval",
        "0,0.6",
        "--out",
        str(out),
        "--no-progress",
    ]
    paths = generate.run("txt2img", args)
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    assert "wrote 2 image(s)" in capsys.readouterr().out
    im = Image.open(paths[1])
    assert im.size == (24, 32) and im.mode == "RGB"
    meta = json.loads(im.text["jaxdiff"])
    assert meta == {
        **meta,
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "seed": 6,
        "steps": 4,
        "sampler": "euler_a",
        "guidance": 7.5,
        "guidance_interval": [0.0, 0.6],
        "width": 24,
        "height": 32,
    }
    assert im.text["seed"] == "6" and im.text["sampler"] == "euler_a"
    # the second image, regenerated alone from its own PNG: the same pixels
    again = generate.run(
        "txt2img", ["--from-png", str(paths[1]), "--out", str(tmp_path / "again"), "--no-progress"]
    )
    assert np.abs(np.asarray(Image.open(again[0]), int) - np.asarray(im, int)).max() <= 1
    # a second run into the same folder adds files, never replaces them
    more = generate.run("txt2img", args[:-3] + ["--out", str(out), "--no-progress"])
    assert [p.name for p in more] == ["00002-5.png", "00003-6.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(more[0])), np.asarray(Image.open(paths[0])))


def test_img2img(model, tmp_path):
    src = tmp_path / "src.jpg"
    from skimage import data

    Image.fromarray(data.chelsea()).resize((44, 30)).save(src)  # resized down to 40x24
    paths = generate.run(
        "img2img",
        [
            "--model",
            str(model),
            "--image",
            str(src),
            "--prompt",
            "a cat",
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
    )
    im = Image.open(paths[0])
    assert im.size == (40, 24)
    meta = json.loads(im.text["jaxdiff"])
    assert (
        meta["strength"] == 0.5
        and meta["source_image"] == str(src.resolve())
        and meta["mode"] == "img2img"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "x", "--model", "{missing}"], "no such model folder"),
        (["--prompt", "x", "--model", "{model}", "--height", "36"], "multiple of 8"),
        (["--prompt", "x", "--model", "{model}", "--sampler", "k_lms"], "unknown sampler"),
        (["--model", "{model}"], "--prompt is required"),
        (["--prompt", "x", "--model", "{incomplete}"], "incomplete model folder, missing unet"),
        (["--prompt", "x", "--model", "{model}", "--steps", "0"], "--steps must be at least 1"),
        (
            ["--prompt", "x", "--model", "{model}", "--guidance-interval", "0.7,0.2"],
            "0 <= lo <= hi <= 1",
        ),
        (["--prompt", "x", "--model", "{model}", "--guidance-interval", "0.5"], "must be LO,HI"),
    ],
)
def test_txt2img_errors(model, tmp_path, args, message):
    incomplete = tmp_path / "incomplete"
    for sub in ("vae", "text_encoder", "tokenizer"):
        (incomplete / sub).mkdir(parents=True)
    (incomplete / "model_index.json").write_text("{}")
    args = [a.format(model=model, missing=tmp_path / "nope", incomplete=incomplete) for a in args]
    n = PL.TRACES["generate"]
    with pytest.raises(SystemExit, match=message):
        generate.run("txt2img", args + ["--out", str(tmp_path / "o")])
    assert PL.TRACES["generate"] == n and not (tmp_path / "o").exists()


def test_img2img_errors(model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    base = ["--model", str(model), "--prompt", "x", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="cannot read image"):
        generate.run("img2img", base + ["--image", str(bad)])
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    with pytest.raises(SystemExit, match=r"strength must be in \[0, 1\]"):
        generate.run("img2img", base + ["--image", str(tmp_path / "ok.png"), "--strength", "1.5"])
    with pytest.raises(SystemExit, match="--image is required"):
        generate.run("img2img", base)


def test_model_folder_sampling_defaults(model, tmp_path):
    """A model's jaxdiff_sampling.json replaces the global defaults for that model; flags replace it; a bad
    file is refused by name before anything is compiled."""
    import shutil

    folder = tmp_path / "with-defaults"
    shutil.copytree(model, folder)
    (folder / generate.SAMPLING_FILE).write_text(
        json.dumps({"steps": 3, "guidance": 2.0, "guidance_interval": [0, 0.5]})
    )
    base = [
        "--model",
        str(folder),
        "--prompt",
        "a red circle",
        "--height",
        "16",
        "--width",
        "16",
        "--no-progress",
    ]
    meta = lambda p: json.loads(Image.open(p).text["jaxdiff"])  # noqa: E731
    got = meta(generate.run("txt2img", base + ["--out", str(tmp_path / "a")])[0])
    assert (got["steps"], got["guidance"], got["guidance_interval"]) == (3, 2.0, [0.0, 0.5])
    got = meta(generate.run("txt2img", base + ["--guidance", "4", "--out", str(tmp_path / "b")])[0])
    assert (got["steps"], got["guidance"], got["guidance_interval"]) == (3, 4.0, [0.0, 0.5])
    assert (
        meta(
            generate.run(
                "txt2img",
                ["--model", str(model)] + base[2:] + ["--steps", "3", "--out", str(tmp_path / "c")],
            )[0]
        )["guidance"]
        == 7.5
    )
    n = PL.TRACES["generate"]
    for text, message in (
        ('{"guidance": 2, "cfg": 1}', "unknown: cfg"),
        ('{"steps": 2.5}', r"steps must be a number \(whole\)"),
        ("[1]", "expected an object"),
        ("{", "cannot read"),
    ):
        (folder / generate.SAMPLING_FILE).write_text(text)
        with pytest.raises(SystemExit, match=message):
            generate.run("txt2img", base + ["--out", str(tmp_path / "bad")])
    assert PL.TRACES["generate"] == n and not (tmp_path / "bad").exists()

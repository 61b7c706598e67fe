"""The prompt-fidelity scorer against ground truth (spec: Scoring)."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from jaxdiff.data import shapes_world as sw
from jaxdiff.eval import fidelity as fd

N = 160  # per split: ~40 scenes of each kind


@pytest.fixture(scope="module")
def world():
    out = {}
    for split in ("train", "heldout"):
        scenes = [sw.sample_scene(split, i, seed=5) for i in range(N)]
        out[split] = ([sw.render(s, 64) for s in scenes], [s.caption for s in scenes])
    return out


def _split_reports(world, transform=lambda im, rng: im):
    rng = np.random.default_rng(0)
    images, captions, splits = [], [], []
    for split, (ims, caps) in world.items():
        images += [transform(im, rng) for im in ims]
        captions += caps
        splits += [split] * len(caps)
    return fd.evaluate(images, captions, splits)


def test_ground_truth_renders(world):
    rep = _split_reports(world)
    assert rep["overall"]["n"] == 2 * N and rep["overall"]["accuracy"] >= 0.99
    assert rep["heldout"]["accuracy"] >= 0.99 and rep["by_split"]["train"]["accuracy"] >= 0.99
    assert all(v["n"] >= 25 and v["accuracy"] >= 0.97 for v in rep["by_kind"].values()), rep[
        "by_kind"
    ]
    assert rep["by_attribute"]["position"]["n"] > 20 and rep["by_attribute"]["background"]["n"] > 20


def test_degraded_renders_all_three_together(world):
    # Blur sigma 1 px, then a per-channel colour shift uniform in +-20, then noise sigma 12/255.
    rep = _split_reports(
        world, lambda im, rng: fd.degrade(im, rng, blur=1.0, noise=12 / 255, shift=20)
    )
    assert rep["overall"]["accuracy"] >= 0.95 and rep["heldout"]["accuracy"] >= 0.95, rep["by_kind"]


def test_mismatched_pairs_and_noise_images(world):
    ims, caps = world["train"]
    mismatched = fd.evaluate(ims, caps[1:] + caps[:1])["overall"]["accuracy"]
    assert mismatched <= 0.08  # chance: the other scene happens to contain the named object (~2 %)
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(60)]
    assert fd.evaluate(noise, caps[:60])["overall"]["accuracy"] == 0.0


def test_128px_clean_and_degraded():
    scenes = [
        sw.sample_scene(split, i, seed=9) for split in ("train", "heldout") for i in range(24)
    ]
    ims = [sw.render(s, 128) for s in scenes]
    caps = [s.caption for s in scenes]
    assert fd.evaluate(ims, caps)["overall"]["accuracy"] == 1.0
    rng = np.random.default_rng(2)
    assert fd.evaluate([fd.degrade(im, rng) for im in ims], caps)["overall"]["accuracy"] >= 0.95


def _image(objects, background="gray", size=64):
    objs = tuple(
        sw.Object(c, s, z, cell, (0.2 + 0.3 * (cell % 3), 0.2 + 0.3 * (cell // 3)), sw.SIZES[z])
        for c, s, z, cell in objects
    )
    return sw.render(sw.Scene("single", background, objs, ""), size)


def test_each_attribute_is_checked():
    one = _image([("red", "star", "large", 2)], "white")
    r = fd.score(one, "a large red star in the top right on a white background")
    assert r["correct"] and r["object"] and r["size"] and r["position"] and r["background"]
    assert r["detected"][0]["cell"] == "top right" and abs(r["detected"][0]["extent"] - 0.30) < 0.01
    r = fd.score(one, "a small red star in the top right on a white background")
    assert not r["correct"] and not r["size"] and r["position"] and r["background"]
    r = fd.score(one, "a large red star at the bottom")
    assert not r["correct"] and r["size"] and not r["position"]
    r = fd.score(one, "a red star on a black background")
    assert not r["correct"] and r["object"] and not r["background"]
    assert (
        not fd.score(one, "a red circle")["correct"] and not fd.score(one, "a pink star")["correct"]
    )
    assert fd.score(one, "a red star")["correct"] and "size" not in fd.score(one, "a red star")

    pair = _image([("blue", "square", "small", 0), ("yellow", "cross", "small", 8)])
    assert fd.score(pair, "a blue square to the left of a yellow cross")["correct"]
    assert fd.score(pair, "a yellow cross below a blue square")["correct"]
    r = fd.score(pair, "a blue square to the right of a yellow cross")
    assert r["object"] and not r["relation"] and not r["correct"]
    assert not fd.score(pair, "a blue square above a yellow circle")["object"]

    three = _image([("green", "triangle", "small", c) for c in (0, 4, 5)])
    assert fd.score(three, "three green triangles")["correct"]
    r = fd.score(three, "two green triangles")
    assert r["object"] and not r["count"] and not r["correct"]


def test_relation_order_and_count_diagnostics(capsys):
    """Why relation and count prompts fail: both objects drawn the named way round, reversed, or in one
    row / column; how many of a counted object the images hold. Reported beside accuracy, printed."""
    pair = _image(
        [("blue", "square", "small", 0), ("yellow", "cross", "small", 2)]
    )  # one row, two columns
    three = _image([("green", "triangle", "small", c) for c in (0, 4, 5)])
    caps = [
        "a blue square to the left of a yellow cross",
        "a blue square to the right of a yellow cross",
        "a yellow cross to the right of a blue square",
        "a blue square above a yellow cross",
        "a blue square above a red cross",
        "three green triangles",
        "two green triangles",
    ]
    ims = [pair] * 5 + [three] * 2
    rep = fd.evaluate(ims, caps)
    order = [r.get("relation_order") for r in rep["results"][:5]]
    assert order == ["named", "reversed", "named", "neither", None]  # the last lacks its red cross
    assert rep["diagnostics"] == {
        "relation_order": {"both_drawn": 4, "named": 2, "reversed": 1, "neither": 1},
        "count_drawn": {"2": {"3": 1}, "3": {"3": 1}},
    }
    assert rep["by_kind"]["relation"]["accuracy"] == 2 / 5
    text = fd.format_report(rep)
    assert "both objects drawn: 4 (named order 2, reversed 1, same row / column 1)" in text
    assert "count 2: images holding 3: 1" in text


def test_bad_input():
    with pytest.raises(ValueError, match="'a red blob'"):
        fd.score(_image([("red", "star", "large", 4)]), "a red blob")
    with pytest.raises(ValueError, match="square uint8 RGB"):
        fd.score(np.zeros((64, 48, 3), np.uint8), "a red star")
    with pytest.warns(UserWarning, match="64 px or above"):
        fd.score(_image([("red", "star", "large", 4)], size=32), "a red star")
    with pytest.raises(ValueError, match="2 images, 1 captions"):
        fd.evaluate([np.zeros((64, 64, 3), np.uint8)] * 2, ["a red star"])


def _png(path, image, **text):
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.fromarray(image).save(path, pnginfo=info)


def test_evaluate_folder_and_cli(tmp_path, capsys):
    from jaxdiff.eval import cli

    scenes = [sw.sample_scene(split, i) for split in ("train", "heldout") for i in range(4)]
    for i, s in enumerate(scenes[:4]):  # PNG text metadata
        _png(tmp_path / f"a{i}.png", sw.render(s, 64), prompt=s.caption, split="train")
    for i, s in enumerate(scenes[4:6]):  # same-named .txt sidecars
        _png(tmp_path / f"b{i}.png", sw.render(s, 64))
        (tmp_path / f"b{i}.txt").write_text(s.caption + "\n")
    lines = []
    for i, s in enumerate(scenes[6:]):  # captions.jsonl
        _png(tmp_path / f"c{i}.png", sw.render(s, 64))
        lines.append(json.dumps({"file": f"c{i}.png", "caption": s.caption, "split": "heldout"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    _png(
        tmp_path / "wrong.png", sw.render(scenes[0], 64), prompt=scenes[1].caption, split="heldout"
    )

    rep = fd.evaluate_folder(tmp_path, json_out=tmp_path / "out" / "r.json", quiet=True)
    assert rep["overall"]["n"] == 9 and rep["by_split"]["train"] == {"n": 4, "accuracy": 1.0}
    assert rep["heldout"] == {"n": 3, "accuracy": 2 / 3} and set(rep["by_split"]) == {
        "train",
        "heldout",
    }
    assert json.loads((tmp_path / "out" / "r.json").read_text())["overall"]["accuracy"] == 8 / 9
    cli.main(["fidelity", "--images", str(tmp_path), "--json", str(tmp_path / "cli.json")])
    out = capsys.readouterr().out
    assert "overall" in out and "88.9%" in out and (tmp_path / "cli.json").is_file()

    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("a red blob")
    _png(tmp_path / "bad.png", sw.render(scenes[0], 64))
    with pytest.raises(ValueError) as e:
        fd.evaluate_folder(tmp_path, quiet=True)
    assert "broken.png: unreadable image" in str(
        e.value
    ) and "bad.png: caption 'a red blob'" in str(e.value)
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main(["fidelity", "--images", str(tmp_path / "missing")])


def test_a_template_outside_the_crop_is_skipped(monkeypatch):
    """Regression (seen on model outputs): a shape template that covers no pixel sample of the crop has zero
    norm; the fit must skip it, not divide by zero."""
    import numpy as np

    from jaxdiff.data import shapes_world as sw
    from jaxdiff.eval import fidelity as F

    alpha = np.zeros((8, 8))
    alpha[2:6, 2:6] = 1.0  # a 4 x 4 square
    coverage = sw.coverage
    monkeypatch.setattr(
        sw,
        "coverage",
        lambda shape, *a: (
            np.zeros_like(coverage(shape, *a)) if shape == "square" else coverage(shape, *a)
        ),
    )
    shape, _, (cx, cy), err = F._fit_shape(alpha, 0, 0, 64)
    assert shape != "square" and np.isfinite(err) and (cx, cy) == (4.0, 4.0)

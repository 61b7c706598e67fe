"""The Frechet distance on fixed shapes-world features."""

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from jaxdiff.eval import frechet as fr
from jaxdiff.eval.fidelity import degrade

N = 300


def _reference_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the classic (non-symmetric) route, float64 numpy
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(40, 12))
    s1, s2 = a.T @ a / 40 + 0.1 * np.eye(12), b.T @ b / 40 + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = _reference_fd(mu1, s1, mu2, s2)
    assert fr.frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)  # diagonal: sum (sqrt a - sqrt b)^2
    assert fr.frechet_distance((mu1[:5], np.diag(d1)), (mu1[:5], np.diag(d2))) == pytest.approx(
        ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), rel=1e-9
    )
    assert abs(fr.frechet_distance((mu1, s1), (mu1, s1))) < 1e-9


@pytest.fixture(scope="module")
def real():
    a = fr.reference_images("train", N)
    b = fr.reference_images("train", N, start=N)
    return a, b, fr.statistics(fr.features(a))


def test_features_are_fixed_and_resolution_free(real):
    a, _, _ = real
    f = fr.features(a[:7])
    assert f.shape == (7, fr.FEATURE_DIM) and np.isfinite(f).all()
    np.testing.assert_array_equal(f, fr.features(a[:7]))
    np.testing.assert_allclose(
        f[3], fr.features(a[3:4])[0], rtol=1e-5, atol=1e-6
    )  # batch-independent
    with pytest.raises(ValueError, match="uint8 images"):
        fr.features(a[:2].astype(np.float32))


def test_real_vs_real_is_small_and_degradations_rank_monotonically(real):
    _, b, stats = real
    real_fd = fr.frechet_distance(stats, fr.statistics(fr.features(b)))
    rng = np.random.default_rng(0)
    ladders = {
        "blur": [dict(blur=s, noise=0, shift=0) for s in (0.5, 1.0, 2.0)],
        "noise": [dict(blur=0, noise=s / 255, shift=0) for s in (4, 12, 32)],
        "shift": [dict(blur=0, noise=0, shift=s) for s in (5, 10, 20)],
    }
    for name, steps in ladders.items():
        values = []
        for kw in steps:
            degraded = np.stack([degrade(im, rng, **kw) for im in b])
            values.append(fr.frechet_distance(stats, fr.statistics(fr.features(degraded))))
        assert real_fd < values[0] < values[1] < values[2], (name, real_fd, values)
        if name == "blur":  # the mildest ladder; measured 0.11 < 0.16 < 0.38 < 1.24 (N = 300)
            assert real_fd < 0.4 * values[1]


def test_cli_against_rendered_reference(real, tmp_path, capsys):
    from jaxdiff.eval import cli

    a, _, _ = real
    for i, im in enumerate(a[:20]):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    cli.main(
        [
            "frechet",
            "--images",
            str(tmp_path),
            "--reference",
            "shapes_world:train",
            "--num",
            "40",
            "--json",
            str(tmp_path / "fd.json"),
        ]
    )
    out = capsys.readouterr().out
    expected = fr.frechet(a[:20], fr.reference_images("train", 40))
    assert f"frechet distance {expected:.4f}" in out
    with pytest.raises(SystemExit, match="unknown split 'test'"):
        cli.main(["frechet", "--images", str(tmp_path), "--reference", "shapes_world:test"])
    with pytest.raises(ValueError, match="at least 2"):
        fr.frechet(a[:1], a)

"""The package's shape: the import contracts hold and can fail, and the wheel's package list is complete."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(
        ROOT / "jaxdiff", tmp_path / "jaxdiff", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _append(path: Path, line: str):
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_contracts_hold(tree):
    out = _lint(tree)
    assert out.returncode == 0 and "2 kept, 0 broken" in out.stdout, out.stdout + out.stderr


def test_a_backwards_import_breaks_the_layers_contract(tree):
    _append(
        tree / "jaxdiff" / "models" / "unet.py", "import jaxdiff.pipelines.stable_diffusion  # noqa"
    )
    out = _lint(tree)
    assert out.returncode != 0 and "BROKEN" in out.stdout
    assert "jaxdiff.models.unet -> jaxdiff.pipelines.stable_diffusion" in out.stdout


def test_train_and_eval_stay_independent(tree):
    _append(tree / "jaxdiff" / "eval" / "fidelity.py", "import jaxdiff.train.loop  # noqa")
    out = _lint(tree)
    assert out.returncode != 0 and "jaxdiff.eval.fidelity -> jaxdiff.train.loop" in out.stdout


def test_an_import_cycle_breaks_the_acyclic_contract(tree):
    _append(tree / "jaxdiff" / "data" / "folder.py", "import jaxdiff.data.pipeline  # noqa")
    out = _lint(tree)
    assert out.returncode != 0 and "no import cycles" in out.stdout and "BROKEN" in out.stdout


def test_the_wheel_lists_every_package():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jaxdiff").rglob("__init__.py")
    }
    assert listed == on_disk | {"jaxdiff.configs"}

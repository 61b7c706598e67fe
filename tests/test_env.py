"""Importing jaxdiff leaves the environment alone; `jaxdiff.runtime.tune_cpu()` (what the commands call
first) adds the XLA:CPU convolution setting, unless told not to."""

import os
import subprocess
import sys

from jaxdiff.runtime import CPU_XLA_FLAGS

IMPORT_ONLY = "import os, jaxdiff, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"
TUNED = (
    "import os, jaxdiff.runtime, jax; jaxdiff.runtime.tune_cpu(); jax.numpy.ones(2).block_until_ready(); "
    "print(os.environ.get('XLA_FLAGS', ''))"
)


def _flags(probe=TUNED, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDIFF_XLA_CPU_TUNING")}
    return subprocess.run(
        [sys.executable, "-c", probe],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()


def test_import_sets_nothing():
    assert _flags(IMPORT_ONLY) == ""
    assert _flags(IMPORT_ONLY, XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
        "--xla_force_host_platform_device_count=2"
    )


def test_cpu_tuning_default_and_opt_out():
    assert _flags() == CPU_XLA_FLAGS  # XLA accepted it: jax ran
    assert _flags(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
        "--xla_force_host_platform_device_count=2 " + CPU_XLA_FLAGS
    )  # appended to the user's flags
    assert _flags(JAXDIFF_XLA_CPU_TUNING="0") == ""
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert _flags(XLA_FLAGS=mine) == mine  # a user's own choice wins

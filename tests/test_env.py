"""Importing jaxdiff turns on the XLA:CPU convolution setting its benchmarks use, unless told not to."""
import os
import subprocess
import sys

from jaxdiff import CPU_XLA_FLAGS

PROBE = "import os, jaxdiff, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"


def _flags(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDIFF_XLA_CPU_TUNING")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_cpu_flag_default_and_opt_out():
    assert _flags() == CPU_XLA_FLAGS                                       # XLA accepted it: jax ran
    assert _flags(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
        "--xla_force_host_platform_device_count=2 " + CPU_XLA_FLAGS)        # appended to the user's flags
    assert _flags(JAXDIFF_XLA_CPU_TUNING="0") == ""
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert _flags(XLA_FLAGS=mine) == mine                                   # a user's own choice wins

"""Process-level settings the jaxdiff commands take explicitly; importing jaxdiff changes nothing.

XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK, whose 3x3 convolutions are ~1.45x slower than
XLA's own (Eigen) ones on the CPUs measured (BENCHMARKS.md: sd15 UNet 0.64x PyTorch's time with the
flag, 0.93x without). XLA reads ``XLA_FLAGS`` when JAX starts its backend, so ``tune_cpu()`` works only
before the first JAX computation: the ``jaxdiff`` command calls it first thing; a Python user calls it
the same way, before touching a device.
"""

from __future__ import annotations

import os

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def tune_cpu() -> bool:
    """Append ``CPU_XLA_FLAGS`` to ``$XLA_FLAGS`` unless ``JAXDIFF_XLA_CPU_TUNING=0`` or the user set that
    flag already; True when it did. A jaxlib without the flag (not 0.10) is left alone: XLA would abort."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (
        os.environ.get("JAXDIFF_XLA_CPU_TUNING", "1") == "0"
        or "xla_cpu_experimental_ynn_fusion_type" in flags
    ):
        return False
    try:
        from jaxlib.version import __version__ as jaxlib_version  # noqa: PLC0415 (imported only when tuning)
    except ImportError:
        return False
    if not jaxlib_version.startswith("0.10."):
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + CPU_XLA_FLAGS).strip()
    return True

"""jaxdiff: the text-to-image diffusion lineage, accelerator-native in JAX/Flax."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK, whose 3x3 convolutions are ~1.45x slower than
# XLA's own (Eigen) ones on the CPUs measured (BENCHMARKS.md: sd15 UNet 0.64x PyTorch's time with this
# flag, 0.93x without). XLA reads XLA_FLAGS when JAX starts its backend, so this only takes effect
# when jaxdiff is imported before the first JAX computation; JAXDIFF_XLA_CPU_TUNING=0 opts out.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _tune_cpu_flags():
    flags = _os.environ.get("XLA_FLAGS", "")
    if _os.environ.get("JAXDIFF_XLA_CPU_TUNING", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    try:  # the flag exists in the jaxlib versions pyproject.toml admits; an unknown flag would abort XLA
        from jaxlib.version import __version__ as jaxlib_version
        if not jaxlib_version.startswith("0.10."):
            return
    except ImportError:
        return
    _os.environ["XLA_FLAGS"] = (flags + " " + CPU_XLA_FLAGS).strip()


_tune_cpu_flags()

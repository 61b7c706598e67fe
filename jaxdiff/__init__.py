"""jaxdiff: the text-to-image diffusion lineage, accelerator-native in JAX/Flax."""

__version__ = "0.1.0"

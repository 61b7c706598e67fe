"""Weight import and export: PyTorch-layout tensors (diffusers, transformers, original SD) <-> Flax params."""

"""Flax modules: UNet, KL-VAE, CLIP towers and their building blocks."""

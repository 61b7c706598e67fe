"""Noise schedules, samplers (pure steps in one lax.scan) and guidance; shape-agnostic."""

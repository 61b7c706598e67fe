"""Evaluation: prompt fidelity on the shapes world and a Frechet distance."""

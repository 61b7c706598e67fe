"""Data: the shapes world, users' image-caption folders, and the input pipeline."""

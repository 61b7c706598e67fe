"""Training: one sharded loop, task steps, checkpoints and observability."""

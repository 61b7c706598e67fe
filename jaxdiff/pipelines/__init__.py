"""Generation pipelines: one jitted program per shape, sharded over a mesh."""

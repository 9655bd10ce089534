"""The run directory: metrics lines, checkpoints, manifest."""

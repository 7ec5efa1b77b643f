"""Training loop, metrics and checkpoints."""

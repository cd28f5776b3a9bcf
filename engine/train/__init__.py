"""Training a personal model: one method per module over shared stages, with checkpoints, priors and memory plans."""

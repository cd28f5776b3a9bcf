"""The resident diffusion pipelines: the base model, InstantID on top of it, and the image safety checker."""

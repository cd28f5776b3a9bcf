"""Drawing with the resident pipeline and users' trained models."""

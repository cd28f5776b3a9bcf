"""Tiny offline-built stand-ins for the real models, for tests and the demo."""

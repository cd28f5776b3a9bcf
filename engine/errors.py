"""The engine's errors: one root, ``EngineError``; each message says what to do about it."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class UnknownPreset(EngineError):
    """A preset name that the engine does not know."""


class WeightsMissing(EngineError):
    """A preset's weight files are not on disk."""


class UnreadableImage(EngineError):
    """Image bytes that Pillow cannot decode (the chat side's checks should have caught them)."""


class InvalidFaceRecord(EngineError):
    """A stored face record that is not in the format ``FaceRecord.to_bytes`` writes."""


class PreviewUnavailable(EngineError):
    """A zero-shot preview was asked of a preset without InstantID (SD1.5 presets have none)."""

"""Progress of a long engine job, as the training loop reports it to whoever runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingProgress:
    """One report from a training loop: ``step`` of ``total`` done (1-based), last loss, time left."""

    step: int
    total: int
    loss: float
    eta_s: float


ProgressSink = Callable[[TrainingProgress], None]
"""Receives a report after every training step; runs on the training thread, so it must be quick."""

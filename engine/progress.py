"""Progress of a long engine job, as the training loop reports it to whoever runs it."""

from __future__ import annotations

import time
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


class ProgressClock:
    """Reports each step to a sink, with an ETA measured over the steps this run has made itself
    (a resumed run does not count the steps it skipped as instant)."""

    def __init__(self, sink: ProgressSink | None, total: int, first_step: int) -> None:
        self._sink = sink
        self._total = total
        self._first_step = first_step
        self._started = time.monotonic()

    def report(self, step: int, loss: float) -> None:
        if self._sink is None or step <= self._first_step:
            return
        per_step = (time.monotonic() - self._started) / (step - self._first_step)
        self._sink(TrainingProgress(step=step, total=self._total, loss=loss, eta_s=per_step * (self._total - step)))

"""An adapter's background work: the tasks it runs, drained or cancelled when it stops.

Every adapter answers each update, album or command in a task of its own, so that one user's
training never delays another user's reply; a `TaskSet` keeps those tasks so that a stop can let
them finish (`drain`) or end them at once (`cancel_all`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_log = logging.getLogger(__name__)

_T = TypeVar("_T")


class TaskSet:
    """Running tasks, drained or cancelled on stop; ``name`` (e.g. the platform) is for the log."""

    def __init__(self, name: str = "background") -> None:
        self._name = name
        self._running: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run ``work`` in a task of the set; an exception it ends with is logged, never raised."""
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    @contextmanager
    def tracking(self, task: asyncio.Task[Any] | None) -> Iterator[None]:
        """Count ``task``, started elsewhere (e.g. by the platform library), as the set's while the
        block runs: a stop cancels it too. Its outcome stays its starter's (nothing is logged)."""
        if task is None:
            yield
            return
        self._running.add(task)
        try:
            yield
        finally:
            self._running.discard(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("a %s task failed", self._name, exc_info=task.exception())

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the running work (and what it starts), then cancel the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._running and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        await self.cancel_all()

    async def cancel_all(self) -> None:
        """Cancel every running task (and what they start meanwhile), and wait for them to end."""
        while self._running:
            running = set(self._running)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self._running -= running

"""The progress throttle every adapter uses: the newest line, at most one edit per interval, and
never a wait for the chat platform inside the job's progress callback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

_log = logging.getLogger(__name__)


class ProgressThrottle:
    """Shows progress lines through ``edit`` (which says whether the edit landed).

    `push` only remembers the line; a background task shows the newest one as soon as ``interval``
    seconds have passed since the last edit (or since `shown` said what the message holds), so lines
    in between are skipped and a slow platform never slows the job. `close` stops it; an edit in
    flight finishes first, so no progress line can land after the result.
    """

    def __init__(
        self,
        edit: Callable[[str], Awaitable[bool]],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._edit = edit
        self._interval = interval
        self._clock = clock
        self._latest: str | None = None
        self._shown: str | None = None
        self._edited_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._editing = asyncio.Lock()
        self.closed = False

    def shown(self, text: str) -> None:
        """The message holds ``text`` now (it was just sent): the next edit waits its interval."""
        self._shown = text
        self._edited_at = self._clock()

    def push(self, line: str) -> None:
        if self.closed:
            return
        self._latest = line
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def close(self) -> None:
        """No more progress; returns once no edit is in flight."""
        self.closed = True
        self._latest = None
        task = self._task
        if task is None or task.done():
            return
        if not self._editing.locked():
            task.cancel()  # only waiting out the interval: nothing to show any more
        await asyncio.gather(task, return_exceptions=True)

    async def _drain(self) -> None:
        while not self.closed and self._latest is not None:
            if self._latest == self._shown:
                self._latest = None
                return
            delay = self._edited_at + self._interval - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self._editing:
                line, self._latest = self._latest, None
                if self.closed or line is None:
                    return
                try:
                    if await self._edit(line):
                        self._shown = line
                except Exception as exc:  # a progress line is not worth failing the command for
                    _log.warning("could not show progress (%s)", type(exc).__name__)
                finally:
                    self._edited_at = self._clock()

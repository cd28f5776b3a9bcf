"""The event loop's clock, and a wait on an event that a stop can always cancel."""

from __future__ import annotations

import asyncio


def now() -> float:
    return asyncio.get_running_loop().time()


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` has passed.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that arrives just as the
    event is set, and a stop would then never end.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass

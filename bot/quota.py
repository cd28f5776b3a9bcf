"""The hourly image quota (``draws_per_hour``): previews and draws, counted before they are queued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bot.errors import RateLimited
from bot.settings import BotSettings
from engine.api import JobName
from storage.db import Database

_HOUR_S = 3600.0
_IMAGE_JOBS = (str(JobName.PREVIEW), str(JobName.DRAW))
"""The job kinds that make images, and so count against draws_per_hour."""
_T = TypeVar("_T")


class DrawQuota:
    """At most ``draws_per_hour`` images in any rolling hour per user, counting those that queued
    and running previews and draws will make."""

    def __init__(self, db: Database, settings: BotSettings, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._locks: dict[int, asyncio.Lock] = {}  # a user's check and job creation, as one step

    async def reserve(self, user_id: int, wanted: int, create: Callable[[], Awaitable[_T]]) -> _T:
        """Check room for ``wanted`` images and ``create`` the job as one step for the user: its
        images are reserved (``count_reserved_images``) before the next request is checked, so
        draws sent at once cannot all pass on an empty count. Raises `RateLimited` with the wait."""
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            await self._check(user_id, wanted)
            return await create()

    async def _check(self, user_id: int, wanted: int) -> None:
        limit = self._settings.draws_per_hour
        now = self._clock()
        made = await self._db.count_images_since(user_id, now - _HOUR_S)
        reserved = await self._db.count_reserved_images(user_id, now - _HOUR_S, _IMAGE_JOBS)
        if made + reserved + wanted <= limit:
            return
        # Reserved images are about to be made: they hold their place for the hour to come.
        raise RateLimited(limit, await self._seconds_until_room(user_id, now, limit - wanted - reserved))

    async def _seconds_until_room(self, user_id: int, now: float, allowed: int) -> float:
        """The least wait after which at most `allowed` images remain in the last hour.

        Only counts are available, so binary-search the window's start to the second.
        """
        if allowed < 0:
            return _HOUR_S
        low, high = 0, int(_HOUR_S)  # waiting `high` seconds always frees the whole window
        while low < high:
            middle = (low + high) // 2
            since = now + middle - _HOUR_S
            if await self._db.count_images_since(user_id, since) <= allowed:
                high = middle
            else:
                low = middle + 1
        return float(max(low, 1))

"""The inbox: platform events received but not yet handled, kept in the database.

A platform adapter keeps an event (e.g. a Telegram upload) as it arrives, so that it can tell the
platform at once that the event arrived; the event leaves the inbox once answered, and a restart
replays what the inbox still holds.
"""

from __future__ import annotations

from typing import Any

from storage.db import Database


class Inbox:
    """One platform's events kept until handled (``platform`` names them apart in the database)."""

    def __init__(self, db: Database, platform: str) -> None:
        self._db = db
        self.platform = platform

    async def keep(self, key: str, payload: dict[str, Any]) -> None:
        """Keep an event (e.g. a Telegram upload) so the platform can be told it arrived before it
        is handled; `replay` returns it after a crash until `done`. A key kept twice keeps the first."""
        await self._db.put_inbound(self.platform, key, payload)

    async def replay(self) -> list[tuple[str, dict[str, Any]]]:
        """Events kept but never marked done (the process stopped in between), oldest first."""
        return await self._db.pending_inbound(self.platform)

    async def done(self, key: str) -> None:
        """The event has been handled: it leaves the inbox (a key not kept is no error)."""
        await self._db.drop_inbound(self.platform, key)

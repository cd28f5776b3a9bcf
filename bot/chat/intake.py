"""Taking in the photos of one message, the same on every platform.

An adapter describes each file the user sent as an `Incoming` (its name, the size the platform
announces and how to fetch it); `take_photos` refuses what is too large before reading a byte,
fetches the rest at once (Discord's attachment URLs expire), and hands everything to the service in
the order it was sent, so the one reply numbers every file the same way on every platform. What a
platform could not give becomes an `Unreceived` line in that reply, never a message of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot import texts
from bot.replies import Reply, Unreceived, Upload, UserRef
from bot.runner import ProgressCallback
from bot.service import BotService
from bot.settings import BotSettings
from engine.api import Refusal


class NotReceived(Exception):
    """Raised by `Incoming.read`: the platform did not give the file; ``why`` follows its label."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class Incoming:
    """One file as the platform announces it, not read yet.

    ``platform_limit`` is the most the platform lets a bot fetch (Telegram's 20 MB), with the line
    to say when a file is over it (``over_platform_limit``), which is more helpful there than ours.
    """

    filename: str | None
    size: int | None
    read: Callable[[], Awaitable[bytes]]
    platform_limit: int | None = None
    over_platform_limit: str = ""


async def receive(files: Sequence[Incoming], settings: BotSettings) -> list[Upload | Unreceived]:
    """Every file in the order sent: its bytes, or why the bot does not have them."""
    max_bytes = settings.max_upload_bytes
    too_large = texts.refused(texts.refusal(Refusal.FILE_TOO_LARGE, settings))

    async def one(file: Incoming) -> Upload | Unreceived:
        if file.size is not None and file.platform_limit is not None and file.size > file.platform_limit:
            return Unreceived(file.filename, file.over_platform_limit)
        if file.size is not None and file.size > max_bytes:
            return Unreceived(file.filename, too_large)
        try:
            data = await file.read()
        except NotReceived as exc:
            return Unreceived(file.filename, exc.why)
        return Upload(file.filename, data)  # the service inspects it and strips its metadata

    return list(await asyncio.gather(*(one(file) for file in files)))


async def take_photos(
    service: BotService,
    user: UserRef,
    files: Sequence[Incoming],
    on_progress: ProgressCallback | None = None,
) -> Reply:
    """One message's photos checked and enrolled: one reply, one line per file, in order."""
    return await service.add_photos(
        user, await receive(files, service.settings), on_progress=on_progress
    )


__all__ = ["Incoming", "NotReceived", "receive", "take_photos"]

"""What the conversation takes in and gives back, the same for every platform: who is talking
(`UserRef`), what they sent (`Upload`), and what to send them (`Reply` with its `ImageOut` images);
`ResumedWork` hands the replies of work finished after a restart to each platform's adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class UserRef:
    """Who is talking: a platform name ("console", "discord", ...) and that platform's user id."""

    platform: str
    platform_user_id: str


@dataclass(frozen=True)
class Upload:
    """One file a user sent, as bytes; `filename` only labels the reply."""

    filename: str | None
    data: bytes


@dataclass(frozen=True)
class ImageOut:
    """A generated image to send: a local file (do not modify it), its face score, its row id."""

    path: Path
    score: float | None
    image_id: int


@dataclass
class Reply:
    """What to send back: text, images, and the queue job ids the command ran (for logs/demos)."""

    text: str
    images: list[ImageOut] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)


class ResumedWork:
    """What `BotService.resume_all` finishes after a restart, handed to the adapters as each
    user's jobs are done: the bot serves new commands meanwhile, and each adapter sends the replies
    of its platform's users (``replies``) from when it is ready."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[tuple[UserRef, Reply]]] = {}

    @classmethod
    def of(cls, replies: dict[UserRef, Reply]) -> ResumedWork:
        """Work already finished (a caller that awaited `resume_all` itself)."""
        work = cls()
        for user, reply in replies.items():
            work.put_nowait(user, reply)
        return work

    def _queue(self, platform: str) -> asyncio.Queue[tuple[UserRef, Reply]]:
        return self._queues.setdefault(platform, asyncio.Queue())

    def put_nowait(self, user: UserRef, reply: Reply) -> None:
        self._queue(user.platform).put_nowait((user, reply))

    async def put(self, user: UserRef, reply: Reply) -> None:
        self.put_nowait(user, reply)

    async def replies(self, platform: str) -> AsyncIterator[tuple[UserRef, Reply]]:
        """The platform's finished work, as it comes; never ends (cancel the task reading it)."""
        queue = self._queue(platform)
        while True:
            yield await queue.get()

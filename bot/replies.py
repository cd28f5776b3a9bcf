"""What the conversation takes in and gives back, the same for every platform: who is talking
(`UserRef`), what they sent (`Upload`), and what to send them (`Reply` with its `ImageOut` images);
`ResumedWork` hands the replies of work finished after a restart to each platform's adapter."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
class Unreceived:
    """A file the user sent that the bot did not get (too large to fetch, a failed download):
    `why` follows its label in the reply ("not kept, …", "refused, …") and says what to do."""

    filename: str | None
    why: str


@dataclass(frozen=True)
class ImageOut:
    """A generated image to send: a local file (do not modify it), its face score, its row id."""

    path: Path
    score: float | None
    image_id: int
    # Where the face-detail pass ran and found a face: the likeness as drawn and after the pass
    # (``score`` is the better one's: that image is the one sent).
    detail: tuple[float, float] | None = None


class Offer(enum.StrEnum):
    """Something the reply offers the user to press (each platform draws it its own way)."""

    CONSENT = "consent"  # agree to the consent text shown: the user has not agreed yet


class Reply:
    """What to send back: lines of text, images, what it offers, and the queue job ids the command
    ran (for logs and demos).

    ``closing`` is where the user stands (e.g. "3 of 3 photos accepted"): shown after every other
    line, so an adapter adds its own lines (an upload it could not fetch) with `add` and the
    closing line stays last. ``text`` is derived; no adapter has to take it apart.
    """

    def __init__(
        self,
        text: str = "",
        images: list[ImageOut] | None = None,
        job_ids: list[str] | None = None,
        *,
        lines: list[str] | None = None,
        closing: str | None = None,
        offers: frozenset[Offer] = frozenset(),
        album: bool = False,
        as_files: bool = False,
    ) -> None:
        self.lines: list[str] = list(lines) if lines is not None else ([text] if text else [])
        self.images: list[ImageOut] = images if images is not None else []
        self.job_ids: list[str] = job_ids if job_ids is not None else []
        self.closing = closing
        self.offers = offers
        self.album = album  # a set of images (a pack): sent as albums, without buttons under each
        # images sent as files, never as photos a chat app recompresses (an upscale, at full size)
        self.as_files = as_files

    @property
    def text(self) -> str:
        return "\n".join([*self.lines, *([self.closing] if self.closing else [])])

    def add(self, *lines: str) -> None:
        """More lines, before the closing one."""
        self.lines.extend(lines)

    def __repr__(self) -> str:
        return f"Reply(lines={len(self.lines)}, images={len(self.images)}, offers={sorted(self.offers)})"


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

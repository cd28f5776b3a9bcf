"""Telegram's side of taking in uploads: the file of a message, albums gathered, updates held back
(the files themselves are fetched and answered by `bot.chat.intake`).

Albums come as one update per item with a shared ``media_group_id``; items are gathered until the
album has been quiet for ``album_wait_s`` and answered with one message. An upload the database
could not keep is held back from Telegram (the getUpdates offset) until it is answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from telegram import Message, Update

from bot.chat.tasks import TaskSet
from bot.telegram.clock import now, wait_event


@dataclass(frozen=True)
class Item:
    """One uploaded file: a photo (its largest size) or a document."""

    update_id: int
    message_id: int
    file_id: str
    size: int | None
    filename: str | None

    @classmethod
    def of(cls, message: Message, update_id: int) -> Item | None:
        if message.photo:
            largest = max(message.photo, key=lambda size: (size.width * size.height, size.file_size or 0))
            return cls(update_id, message.message_id, largest.file_id, largest.file_size, None)
        if message.document is not None:
            document = message.document
            return cls(
                update_id, message.message_id, document.file_id, document.file_size, document.file_name
            )
        return None


def is_upload(update: Update) -> bool:
    message = update.message
    return message is not None and bool(message.photo or message.document)


class Albums:
    """Gathers album items (one update each) until the album has been quiet for ``wait_s``."""

    def __init__(self, wait_s: float, tasks: TaskSet) -> None:
        self._wait_s = wait_s
        self._tasks = tasks
        self._open: dict[Hashable, _Album] = {}

    def add(
        self,
        key: Hashable,
        item: Item,
        answer: Callable[[], Callable[[list[Item]], Awaitable[None]]],
    ) -> None:
        """Add an item; for an album's first, ``answer()`` gives what will answer the album."""
        album = self._open.get(key)
        if album is None:
            album = self._open[key] = _Album()
            self._tasks.spawn(self._gather(key, album, answer()))
        album.items.append(item)
        album.quiet_at = now() + self._wait_s

    def flush_all(self) -> None:
        """Answer every album now (on stop)."""
        for album in self._open.values():
            album.now.set()

    async def _gather(
        self, key: Hashable, album: _Album, answer: Callable[[list[Item]], Awaitable[None]]
    ) -> None:
        while not album.now.is_set() and (delay := album.quiet_at - now()) > 0:
            await wait_event(album.now, delay)
        del self._open[key]
        await answer(album.items)


class _Album:
    def __init__(self) -> None:
        self.items: list[Item] = []
        self.quiet_at = 0.0
        self.now = asyncio.Event()


class Holds:
    """Update ids of uploads not yet answered that are not kept in the inbox either (the database
    failed): the getUpdates offset never passes the lowest. ``on_release`` hears of every update
    answered, held or not."""

    def __init__(self, on_release: Callable[[int], None] | None = None) -> None:
        self._held: set[int] = set()
        self._claimed: set[int] = set()  # album items: released by the album, not their update
        self._on_release = on_release
        self._next: int | None = None  # one past the newest update fetched
        self.changed = asyncio.Event()

    def fetched(self, update_id: int, *, hold: bool) -> None:
        self._next = max(self._next or 0, update_id + 1)
        if hold:
            self._held.add(update_id)

    def claim(self, update_id: int) -> None:
        self._claimed.add(update_id)

    def settle(self, update_id: int) -> None:
        """The update's handler returned: release it unless an album answers for it."""
        if update_id not in self._claimed:
            self.release(update_id)

    def release(self, update_id: int) -> None:
        self._held.discard(update_id)
        self._claimed.discard(update_id)
        self.changed.set()
        if self._on_release is not None:
            self._on_release(update_id)

    def confirm_below(self, update_id: int) -> int:
        """Stop holding back the updates below ``update_id``; returns how many were held."""
        given_up = {i for i in self._held if i < update_id}
        self._held -= given_up
        self._next = max(self._next or 0, update_id)
        return len(given_up)

    def offset(self) -> int | None:
        """The getUpdates offset: the oldest unanswered upload, else one past the newest update."""
        return min(self._held) if self._held else self._next
